"""``python -m bench.scale --leases 10000 --churn 1000 [--kernel-vxlan | --backend host-gw]``:
the scale probe (``overlay.lab.scale_probe``, also ``overlay testbed scale``) with the same
flags, its figures printed and, with ``--json``, written.

Heavy: run it under ``flock /work/heavy.lock``.
"""

from __future__ import annotations

import os
import sys

from overlay.cli.parser import OneLineParser
from overlay.cli.testbed import add_scale_flags, scale_options
from overlay.lab.scale_probe import report, run, write_json


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench.scale", description=__doc__)
    add_scale_flags(parser)
    args = parser.parse_args(argv)
    options = scale_options(parser, args)
    command = "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    figures = run(options, command)
    print(report(figures))
    if args.json:
        write_json(figures, args.json)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
