"""`python -m overlay` is the `overlay` command."""

import sys

from overlay.cli import main

sys.exit(main())
