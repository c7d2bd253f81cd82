"""`python -m overlay` is the `overlay` command."""

import sys

from overlay.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
