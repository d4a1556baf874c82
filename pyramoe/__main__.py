"""`python -m pyramoe ...` (what torchrun runs: `torchrun --nproc-per-node N -m pyramoe train ...`)."""

import sys

from pyramoe.cli.main import main

sys.exit(main())
