"""One `overlay run` in a network namespace, its JSON log in a file: for the tests of
lifecycle and flanneld behaviours that need a daemon, not a testbed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.helpers.paths import ROOT


class Daemon:
    """`overlay run` in a namespace, its JSON log in a file."""

    def __init__(
        self,
        ns: str,
        tmp: Path,
        *args: str,
        env: dict[str, str] | None = None,
        lo: bool = True,
        log: Path | None = None,
    ):
        """``log``: where its output goes (appended to) instead of ``tmp/daemon.log``."""
        self.tmp = tmp
        self.log = log or tmp / "daemon.log"
        self.subnet_file = tmp / "subnet.env"
        self.socket = tmp / "status.sock"
        argv = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "overlay", "run",
            *(["--iface", "lo"] if lo else []), "--log-format", "json",
            "--status-socket", str(self.socket),
            *args,
        ]  # fmt: skip
        if "--subnet-file" not in args:
            argv += ["--subnet-file", str(self.subnet_file)]
        environ = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        with open(self.log, "ab" if log else "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environ)

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                found.append({"event": line, "level": "unparsed"})
        return found

    def wait_event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} event: {self.log.read_text()[-1500:]}")

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """(exit status, seconds from the signal to exit)."""
        started = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            tail = self.events()[-3:]
            raise AssertionError(f"still running 10 s after {signum}: {tail}") from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
