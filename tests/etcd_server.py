"""A real etcd (Debian's etcd-server) for the tests: started on a free loopback port, in a
temporary data dir, and always stopped (also when a test fails)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", netns: str | None = None,
                 tls: dict[str, str] | None = None) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed (`make setup` installs etcd-server)")
        self.data_dir = data_dir
        self.host = host
        self.netns = netns
        self.tls = tls or {}
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.with_suffix(".log")

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def start(self, timeout: float = 20.0) -> EtcdServer:
        cmd = [
            *self._prefix(), "etcd", "--name", "test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-cluster", f"test=http://{self.host}:{self.peer_port}",
            "--log-level", "error",
        ]
        if self.tls:
            cmd += ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                    "--trusted-ca-file", self.tls["ca"], "--client-cert-auth"]
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log.read_text()[-500:]}")
            if self.ctl("endpoint", "health", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy: {self.log.read_text()[-500:]}")

    def ctl(self, *args: str, check: bool = True, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        cmd = [*self._prefix(), "etcdctl", "--endpoints", self.endpoint, "--dial-timeout", "2s",
               "--command-timeout", "5s"]
        if self.tls:
            cmd += ["--cacert", self.tls["ca"], "--cert", self.tls["client_cert"],
                    "--key", self.tls["client_key"]]
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env,
                              check=check, input=input, timeout=30)

    def put(self, key: str, value: str) -> None:
        self.ctl("put", key, "--", value) if value.startswith("-") else self.ctl("put", key, value)

    def get(self, key: str) -> str | None:
        out = self.ctl("get", key, "--print-value-only").stdout
        return out[:-1] if out else None

    def stop(self) -> None:
        """SIGKILL: the way a crashed etcd goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def revision(self) -> int:
        import json

        out = self.ctl("endpoint", "status", "-w", "json").stdout
        return int(json.loads(out)[0]["Status"]["header"]["revision"])

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
