"""A real etcd (Debian's etcd-server) for the tests: started on a free loopback port, in a
temporary data dir, and always stopped (also when a test fails).

``stop()`` is a SIGKILL (what a crash looks like); ``start()`` again brings the same
member back on the same port with the same data. ``pause()``/``resume()`` freeze it
(SIGSTOP/SIGCONT): the TCP connections stay up but nothing answers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        netns: str | None = None,
        tls: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        """``tls``: paths under the keys cert, key, ca (server side; client certificates
        are then required) and client_cert, client_key (what ``ctl`` presents); ``extra``:
        more etcd flags."""
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed (`make setup` installs etcd-server)")
        self.data_dir = data_dir
        self.host = host
        self.netns = netns
        self.tls = tls or {}
        self.extra = list(extra)
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

    @property
    def pid(self) -> int:
        """The etcd process itself (``ip netns exec`` execs it, so the pid is etcd's)."""
        assert self.proc is not None, "etcd is not running"
        return self.proc.pid

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def start(self, timeout: float = 20.0) -> EtcdServer:
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [
            *self._prefix(),
            "etcd",
            "--name",
            "test",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"test={peer}",
            "--log-level",
            "error",
            *self.extra,
        ]
        if self.tls:
            cmd += [
                "--cert-file",
                self.tls["cert"],
                "--key-file",
                self.tls["key"],
                "--trusted-ca-file",
                self.tls["ca"],
                "--client-cert-auth",
            ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"etcd exited: {self.log.read_text()[-500:]}")
            if self.ctl("endpoint", "health", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy: {self.log.read_text()[-500:]}")

    def ctl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            *self._prefix(),
            "etcdctl",
            "--endpoints",
            self.endpoint,
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "5s",
        ]
        if self.tls:
            cmd += [
                "--cacert",
                self.tls["ca"],
                "--cert",
                self.tls["client_cert"],
                "--key",
                self.tls["client_key"],
            ]
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            env=env,
            check=check,
            input=input,
            timeout=30,
        )

    def put(self, key: str, value: str, *, lease: str | None = None) -> None:
        """``etcdctl put`` (``lease``: a hex lease ID from ``grant``; None: no TTL)."""
        self.ctl("put", *([f"--lease={lease}"] if lease else []), key, "--", value)

    def get(self, key: str) -> str | None:
        out = self.ctl("get", key, "--print-value-only").stdout
        return out[:-1] if out else None

    def keys(self, prefix: str) -> list[str]:
        out = self.ctl("get", prefix, "--prefix", "--keys-only").stdout
        return [line for line in out.splitlines() if line]

    def lease_of(self, key: str) -> int:
        """The etcd lease ID attached to ``key`` (0: none, i.e. a reservation)."""
        kvs = json.loads(self.ctl("get", key, "-w", "json").stdout).get("kvs", [])
        assert kvs, f"{key} does not exist"
        return int(kvs[0].get("lease", 0))

    def grant(self, ttl: int) -> str:
        """A new etcd lease; its ID in hex, as etcdctl takes it."""
        out = self.ctl("lease", "grant", str(ttl)).stdout  # "lease 694d... granted with TTL(600s)"
        return out.split()[1]

    def revision(self) -> int:
        out = self.ctl("endpoint", "status", "-w", "json").stdout
        return int(json.loads(out)[0]["Status"]["header"]["revision"])

    def stop(self) -> None:
        """SIGKILL: the way a crashed etcd goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused etcd dies as well
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def etcd_in_netns(
    data_dir: Path, label: str, tls: dict[str, str] | None = None
) -> Iterator[tuple[str, EtcdServer]]:
    """(namespace, running etcd on its 127.0.0.1): a namespace of its own (lo only) for a
    module's daemons; on exit etcd, whatever the tests left running in there, and the
    namespace go."""
    from overlay.lab.netns import create_netns, netns_pids, remove_netns, terminate

    ns = f"{label[0]}{uuid.uuid4().hex[:7]}-{label[:3]}"
    create_netns(ns)
    try:
        with EtcdServer(data_dir, netns=ns, tls=tls) as server:
            yield ns, server
    finally:
        terminate(netns_pids(ns), 2.0)  # only what the tests started lives in there
        remove_netns(ns)
