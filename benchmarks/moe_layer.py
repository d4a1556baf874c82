"""Same as `pyramoe bench moe-layer`; kept here so benchmarks/ lists every benchmark program."""

import sys

from pyramoe.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "moe-layer", *sys.argv[1:]]))
