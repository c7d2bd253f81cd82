"""A testbed's etcd: one member, or a cluster of up to ``MAX_MEMBERS``, each a real etcd
(Debian's etcd-server) in the underlay namespace on the bridge, on the underlay's last
host addresses (member m on the m-th address from the top). Its data, pid and log files
live in the testbed's state directory, so it survives restarts and ``down`` finds it.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from overlay.lab.errors import TestbedError
from overlay.lab.netns import entered, log_tail, pid_alive, pid_cmdline

CLIENT_PORT = 2379
PEER_PORT = 2380
START_TIMEOUT = 20.0
MAX_MEMBERS = 7
TXN_OPS = 128  # etcd's default --max-txn-ops


class EtcdCluster:
    def __init__(
        self,
        name: str,
        members: int,
        netns: str,
        underlay: IPv4Network | IPv6Network,
        state_dir: Path,
    ) -> None:
        self.name = name  # the testbed's prefix: member names and the cluster token
        self.members = members
        self.netns = netns  # where the members run (the testbed's underlay namespace)
        self.underlay = underlay
        self.state_dir = state_dir

    def member_ip(self, member: int) -> IPv4Address | IPv6Address:
        return self.underlay.broadcast_address - member

    def url(self, member: int, port: int) -> str:
        """``http://host:port`` of a member (an IPv6 host in brackets)."""
        ip = self.member_ip(member)
        return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL, member 1 first (the daemons try them in turn)."""
        return [self.url(m, CLIENT_PORT) for m in range(1, self.members + 1)]

    def file(self, member: int, suffix: str) -> Path:
        """etcd, etcd.pid, etcd.log for member 1 (as with one member); etcd2... after."""
        return self.state_dir / f"etcd{member if member > 1 else ''}{suffix}"

    def etcdctl(
        self, *args: str, check: bool = True, endpoints: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """etcdctl against every member (or ``endpoints``), from the underlay namespace."""
        return subprocess.run(
            [
                *("ip", "netns", "exec", self.netns, "etcdctl"),
                *("--endpoints", ",".join(endpoints or self.endpoints)),
                *("--dial-timeout", "2s", "--command-timeout", "5s"),
                *args,
            ],
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
            env=dict(os.environ, ETCDCTL_API="3"),
        )

    def _chosen(self, member: int | None) -> list[int]:
        if member is None:
            return list(range(1, self.members + 1))
        if not 1 <= member <= self.members:
            raise TestbedError(f"etcd member {member} is not among 1..{self.members}")
        return [member]

    def _argv(self, m: int) -> list[str]:
        client = self.url(m, CLIENT_PORT)
        if self.members == 1:
            name, peer = self.name, f"http://127.0.0.1:{PEER_PORT}"
            cluster = f"{name}={peer}"
        else:
            name, peer = f"{self.name}m{m}", self.url(m, PEER_PORT)
            cluster = ",".join(
                f"{self.name}m{k}={self.url(k, PEER_PORT)}" for k in range(1, self.members + 1)
            )
        return [
            *("ip", "netns", "exec", self.netns, "etcd", "--name", name),
            *("--data-dir", str(self.file(m, ""))),
            *("--listen-client-urls", client, "--advertise-client-urls", client),
            *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
            *("--initial-cluster", cluster, "--initial-cluster-token", self.name),
            *("--log-level", "error"),
        ]

    def start(self, member: int | None = None) -> None:
        """Start (or restart, after ``stop``) every member, or one; their data survives
        restarts. Returns once each started member is healthy (a member of a cluster is
        healthy once a quorum is up)."""
        procs = {}
        for m in self._chosen(member):
            with open(self.file(m, ".log"), "ab") as log:
                procs[m] = subprocess.Popen(
                    self._argv(m),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.file(m, ".pid").write_text(f"{procs[m].pid}\n")
        deadline = time.monotonic() + START_TIMEOUT
        waiting = dict(procs)
        while waiting and time.monotonic() < deadline:
            for m, proc in list(waiting.items()):
                if proc.poll() is not None:
                    deadline = 0.0
                    break
                endpoint = self.url(m, CLIENT_PORT)
                health = self.etcdctl("endpoint", "health", check=False, endpoints=[endpoint])
                if health.returncode == 0:
                    del waiting[m]
            if waiting:
                time.sleep(0.1)
        if waiting:
            m = min(waiting)
            raise TestbedError(
                f"etcd did not come up on {self.url(m, CLIENT_PORT)}: "
                f"{log_tail(self.file(m, '.log'))}"
            )

    def stop(self, member: int | None = None) -> None:
        """SIGKILL every member, or one (what a crash looks like)."""
        for pid in self.pids(member):
            os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not pid_alive(pid):
                    break
                time.sleep(0.05)

    def freeze(self, member: int | None = None) -> None:
        """SIGSTOP every member, or one: connections stay open and nothing answers (a
        hung disk, a paused VM). ``thaw`` undoes it; ``stop`` kills them."""
        for pid in self.pids(member):
            os.kill(pid, signal.SIGSTOP)

    def thaw(self, member: int | None = None) -> None:
        for pid in self.pids(member):
            os.kill(pid, signal.SIGCONT)

    def pids(self, member: int | None = None) -> list[int]:
        """The pids of the members (or one) still running: ours by their pid file and
        their command line."""
        pids = []
        for m in self._chosen(member):
            try:
                pid = int(self.file(m, ".pid").read_text())
            except (OSError, ValueError):
                continue
            if "etcd" in pid_cmdline(pid):
                pids.append(pid)
        return pids


class EtcdGateway:
    """etcd's v3 JSON gateway over one kept-alive connection made inside ``netns``: how
    the bench and ``overlay testbed leases`` write many keys fast, from outside the
    testbed (no etcdctl process per key)."""

    def __init__(
        self, netns: str, host: IPv4Address | IPv6Address, port: int = CLIENT_PORT
    ) -> None:
        with entered(netns):
            sock = socket.create_connection((str(host), port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.http = http.client.HTTPConnection(str(host), port, timeout=10)
        self.http.sock = sock

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.http.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = self.http.getresponse()
        data = response.read()
        if response.status != 200:
            raise TestbedError(f"etcd {path}: HTTP {response.status}: {data[:200]!r}")
        result: dict[str, Any] = json.loads(data)
        return result

    def grant(self, ttl: int) -> str:
        """A new etcd lease (its decimal ID, as the gateway takes it)."""
        return str(self.call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def put(self, key: str, value: str, lease: str | None = None) -> int:
        """One put; the revision it made."""
        body = {"key": _b64(key), "value": _b64(value), **({"lease": lease} if lease else {})}
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> int:
        return int(self.call("/v3/kv/deleterange", {"key": _b64(key)})["header"]["revision"])

    def put_many(self, items: Sequence[tuple[str, str]], lease: str | None = None) -> None:
        """Many puts, TXN_OPS per transaction (each transaction is one revision)."""
        for start in range(0, len(items), TXN_OPS):
            ops = [
                {
                    "requestPut": {
                        "key": _b64(key),
                        "value": _b64(value),
                        **({"lease": lease} if lease else {}),
                    }
                }
                for key, value in items[start : start + TXN_OPS]
            ]
            self.call("/v3/kv/txn", {"success": ops})

    def revoke(self, lease: str) -> None:
        """Revoke an etcd lease: every key attached to it goes."""
        self.call("/v3/lease/revoke", {"ID": lease})

    def close(self) -> None:
        self.http.close()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
