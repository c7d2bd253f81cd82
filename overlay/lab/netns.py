"""Small network-namespace helpers of the testbed (and of the CNI tests and the bench).

Namespaces are made with pyroute2 (the same bind mount under /run/netns that
``ip netns add`` makes, so both tools see them); commands run inside one through
``ip netns exec``, which also gives the command a matching /sys. A testbed makes its
hundreds of namespaces and links through one ``ip -batch`` per stage and configures
each namespace from inside (``entered``), so no stage forks a process per node.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tun.rtnl import IPRoute, netns

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def list_netns() -> list[str]:
    return sorted(netns.listnetns())


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def create_netns(name: str) -> None:
    """Create a namespace with ``lo`` up (nothing works over 127.0.0.1 otherwise)."""
    netns.create(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def ip_batch(commands: Sequence[str], netns: str | None = None, timeout: float = 120.0) -> None:
    """Run iproute2 commands in one ``ip -batch`` (in namespace ``netns``): a stage of
    hundreds of commands costs one process, not one each. Stops at the first failure and
    raises OSError with iproute2's words for it."""
    if not commands:
        return
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = subprocess.run(
        argv,
        input="".join(f"{command}\n" for command in commands),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        said = " | ".join(proc.stderr.strip().splitlines()[-2:]) or f"exit {proc.returncode}"
        raise OSError(f"ip -batch{f' in netns {netns}' if netns else ''}: {said}")


def create_netns_all(names: Sequence[str]) -> None:
    """Create many namespaces through one ``ip -batch``, each with ``lo`` up."""
    ip_batch([f"netns add {name}" for name in names])
    for name in names:
        with entered(name), IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def remove_netns_all(names: Sequence[str]) -> list[str]:
    """Delete many namespaces (their links go with them); returns a line per one that
    could not be removed. A missing one is fine."""
    errors = []
    for name in names:
        try:
            remove_netns(name)
        except OSError as e:
            errors.append(f"deleting netns {name}: {e}")
    return errors


def remove_netns(name: str) -> None:
    """Unmount and delete a namespace; a missing one is fine (idempotent cleanup)."""
    if not netns_exists(name):
        return
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body in network namespace ``name`` (this thread only, and the threads it
    starts meanwhile); sockets made here stay in that namespace after we switch back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to our own namespace")
    finally:
        os.close(target)
        os.close(home)


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def run_in(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run a command inside a namespace (``ip netns exec``), like subprocess.run."""
    return subprocess.run(exec_argv(name, argv), **kwargs)


def sysctl_in(name: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    proc = run_in(name, ["sh", "-c", f"echo {value} > {path}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"sysctl {key}={value} in netns {name}: {proc.stderr.strip()}")


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (what ``ip netns pids`` prints)."""
    return netns_pids_all([name])


def netns_pids_all(names: Sequence[str]) -> list[int]:
    """Processes in any of these namespaces, from one walk of /proc (not one walk per
    namespace: 401 of them for a 200-node bed)."""
    targets = set()
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except FileNotFoundError:
            continue
        targets.add((st.st_dev, st.st_ino))
    if not targets:
        return []
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in targets:
            pids.append(int(entry))
    return pids


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie counts as gone (it is left for its parent to
    reap, so a caller's Popen still gets the real exit status) once all its threads are:
    after a SIGKILL the main thread can be a zombie while the others still exit and
    hold the process's files (a daemon's status socket still answering)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state not in ("Z", "X"):
        return True
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def log_tail(path: Path, lines: int = 3, limit: int = 600) -> str:
    """The last lines of a log file, for a one-line error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    last = [line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()]
    joined = " | ".join(last) or "(empty log)"
    return joined if len(joined) <= limit else "..." + joined[-limit:]


def terminate(pids: Sequence[int], timeout: float = 5.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        live = [pid for pid in pids if pid_alive(pid)]
        for pid in live:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            live = [pid for pid in live if pid_alive(pid)]
            if live:
                time.sleep(0.05)
        if not live:
            return


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(address: str, count: int = 1, timeout: float = 2.0) -> int:
    """ICMP echo from the current namespace; returns how many replies came back.

    The machine may have no ``ping`` binary; this needs only a raw socket (root).
    """
    replies = 0
    ident = os.getpid() & 0xFFFF
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for seq in range(1, count + 1):
            payload = b"overlay-ping" + struct.pack("!d", time.time())
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
            try:
                sock.sendto(packet, (address, 0))
            except OSError as e:
                if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    continue
                raise
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, (source, _) = sock.recvfrom(65535)
                except TimeoutError:
                    break
                ihl = (data[0] & 0x0F) * 4
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
                if kind == 0 and source == address and (rid, rseq) == (ident, seq):
                    replies += 1
                    break
    return replies


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m overlay.lab.netns ping ADDRESS [COUNT]``: exit 0 if every echo came back."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3) or args[0] != "ping":
        sys.stderr.write("usage: python -m overlay.lab.netns ping ADDRESS [COUNT]\n")
        return 2
    count = int(args[2]) if len(args) == 3 else 1
    got = ping(args[1], count)
    print(f"{got}/{count} replies from {args[1]}")
    return 0 if got == count else 1


if __name__ == "__main__":
    sys.exit(main())
