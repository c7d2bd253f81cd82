"""`python -m bench` (and `overlay bench`, which hands over to it): the benchmark matrix."""

import sys

from bench.report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
