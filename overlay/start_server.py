"""`python -m overlay.start_server STATE_DIR [--etcd]`: the testbed's start server
(``overlay.lab.starter``). It imports what ``overlay run`` imports, once (with --etcd
also the etcd client, which starts nothing at import), then forks a child per
node daemon; each child runs ``overlay ARGV`` through the same entry as ``python -m
overlay``. STATE_DIR is only there to name the bed in ``ps`` and the pid check of
``overlay testbed`` (a forked daemon keeps the server's command line)."""

import sys
from pathlib import Path

import control.file_registry  # noqa: F401  (the file registry: opened by the daemon later)
import overlay.cli.run  # noqa: F401  (the daemon: its imports are what the fork saves)
from overlay.cli.main import main
from overlay.lab.starter import serve

if __name__ == "__main__":
    if "--etcd" in sys.argv[2:]:
        import control.etcd_registry  # noqa: F401  (what --etcd-endpoints imports)
    argv = serve()
    if argv is None:
        sys.exit(0)
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *argv]  # as `python -m overlay`
    sys.exit(main(argv))
