"""Same as `pyramoe bench train-step`; kept here so benchmarks/ lists every benchmark program."""

import sys

from pyramoe.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train-step", *sys.argv[1:]]))
