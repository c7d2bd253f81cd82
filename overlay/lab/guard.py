"""The guard of an ``overlay testbed up``: a small process in a session of its own that
tears the bed down if ``up`` dies before it finishes (``kill -9``, the OOM killer, a lost
terminal), so nothing is left behind even when ``up`` cannot clean up after itself.

``up`` holds the write end of a pipe whose read end is the guard's stdin. When the bed is
built, ``up`` writes ``built`` and closes it: the guard exits and the bed stays. If the
pipe closes without that word, its writer is gone and the guard runs ``down`` for the
prefix (which finds everything by name, as after any crash). A Ctrl-C of ``up`` rolls
back by itself and closes the pipe too: the guard's ``down`` then finds nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO

from overlay.lab.testbed import Testbed

BUILT = b"built\n"


class Guard:
    """The running guard of one ``up``; ``built()`` dismisses it."""

    def __init__(self, prefix: str, state_dir: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "overlay.lab.guard", prefix, str(state_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not in up's process group: a kill of the group spares it
            env=env,
        )
        assert self.proc.stdin is not None
        self._pipe: IO[bytes] = self.proc.stdin

    def built(self) -> None:
        """The bed is up: the guard exits without touching it."""
        self._pipe.write(BUILT)
        self._pipe.close()
        self.proc.wait(timeout=10)

    def abandon(self) -> None:
        """``up`` failed and rolled back: the guard's ``down`` is a harmless repeat."""
        self._pipe.close()
        self.proc.wait(timeout=60)


def main(argv: list[str]) -> int:
    """``python -m overlay.lab.guard PREFIX STATE_DIR``: wait for ``up``, down if it died."""
    prefix, state_dir = argv
    word = sys.stdin.buffer.read()  # until up closes the pipe, or dies
    if word == BUILT:
        return 0
    Testbed(prefix, state_dir=state_dir, registry="file").down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
