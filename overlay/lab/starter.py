"""The testbed's start server: one process that has imported the daemon's modules once and
forks a child per node daemon, so a 200-node bed pays the imports (~0.3 CPU-s each on
this machine) once instead of 200 times.

The program (``python -m overlay.start_server STATE_DIR``, on the programs' floor since it
imports the CLI) imports what ``overlay run`` imports and calls ``serve``. ``serve`` reads
one JSON request a line on stdin and answers one line on stdout:

- ``{"start": [{"netns": N, "argv": [...], "log": PATH}, ...]}`` -> ``{"pids": [...]}``:
  all forked in one go (a bed's 200 in one request: no round trip per daemon while the
  first ones already compete for the CPU). Each child enters namespace N as ``ip netns
  exec N`` does (``enter_netns``), with stdin on /dev/null, stdout and stderr appended
  to PATH, in a session of its own, and runs ``overlay ARGV`` through the same CLI
  entry as a plain ``python -m overlay ARGV``: ``serve`` returns ARGV in the child and
  the program runs it, so the child unwinds and exits through the interpreter like any
  ``overlay run``.
- ``{"poll": P}`` -> ``{"code": C}``: P's exit status once it has exited (else null).

The server is single-threaded and has no event loop, so forking is safe; it refuses to
fork if a thread ever exists (an import that started one). It reaps its children at
least every REAP_INTERVAL, so a dead daemon is never a long-lived zombie, and it exits
when its stdin closes (the testbed ended, also by ``kill -9``): its children live on,
inherited by init, found by the bed's pid files and namespaces like any daemon. It also
stops in the middle of a batch if its stdin closes: no daemon is forked after ``up``
died, while its guard's ``down`` looks for what to remove.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from overlay.lab.errors import TestbedError
from overlay.lab.netns import log_tail, pid_alive

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
REAP_INTERVAL = 0.05  # seconds between reaps while no request comes
STOP_TIMEOUT = 5.0

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2
ST_RDONLY = 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_netns(name: str) -> None:
    """What ``ip netns exec NAME`` does before it execs (iproute2's netns_switch): join
    the network namespace, then a mount namespace of our own where /sys is a sysfs of
    that network namespace (so /sys/class/net lists its links) and /etc/netns/NAME/*
    is bind-mounted over /etc/*. The daemon itself reads only /proc/sys, but the programs
    it runs (iptables, ip) see the same files as under ``ip netns exec``."""
    fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns into {name}")
    finally:
        os.close(fd)
    _check(_libc.unshare(CLONE_NEWNS), "unshare the mount namespace")
    # No mount of ours propagates back to the parent's namespace.
    _check(_libc.mount(b"", b"/", b"none", MS_SLAVE | MS_REC, None), "mount --make-rslave /")
    flags = 0
    if _libc.umount2(b"/sys", MNT_DETACH) != 0 and os.statvfs("/sys").f_flag & ST_RDONLY:
        flags = MS_RDONLY  # a read-only sysfs we could not unmount can only be shadowed so
    _check(_libc.mount(name.encode(), b"/sys", b"sysfs", flags, None), "mount of /sys")
    etc = NETNS_ETC_DIR / name
    if etc.is_dir():
        for entry in sorted(etc.iterdir()):
            # iproute2 goes on past a file that cannot be bound; so do we.
            _libc.mount(bytes(entry), f"/etc/{entry.name}".encode(), b"none", MS_BIND, None)


def serve(stdin_fd: int = 0, stdout_fd: int = 1) -> list[str] | None:
    """The server loop. Returns None in the server when the testbed closed the pipe;
    returns the ``overlay`` argv to run in each forked child."""
    # Import-time objects into the permanent generation: the children's collections then
    # never touch (and copy) the pages they share with the server.
    gc.collect()
    gc.freeze()
    exited: dict[int, int] = {}
    children: set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([stdin_fd], [], [], REAP_INTERVAL)
        _reap(children, exited)
        if not ready:
            continue
        chunk = os.read(stdin_fd, 65536)
        if not chunk:
            return None
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            reply: dict[str, Any]
            try:
                request = json.loads(line)
                if "start" in request:
                    pids = []
                    for start in request["start"]:
                        if _hung_up(stdin_fd):
                            return None  # up died mid-batch: its guard's down is running
                        pid = _fork(start)
                        if pid == 0:
                            return [str(arg) for arg in start["argv"]]
                        children.add(pid)
                        pids.append(pid)
                    reply = {"pids": pids}
                else:
                    pid = int(request["poll"])
                    _reap(children, exited)
                    reply = {"code": exited.get(pid)}
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                reply = {"error": str(e)}
            os.write(stdout_fd, json.dumps(reply).encode() + b"\n")


def _hung_up(fd: int) -> bool:
    """The testbed's end of the pipe is closed (it exited, or was killed)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def _reap(children: set[int], exited: dict[int, int]) -> None:
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            children.discard(pid)
            continue
        if done:
            children.discard(pid)
            exited[pid] = os.waitstatus_to_exitcode(status)


def _fork(start: dict[str, Any]) -> int:
    """Fork one daemon; 0 in the child, which has entered its namespace by then (or
    exited with the reason in its log, as ``ip netns exec`` would)."""
    netns, log = str(start["netns"]), str(start["log"])
    if threading.active_count() != 1:
        raise RuntimeError(f"{threading.active_count()} threads: forking now is unsafe")
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(3, _max_fd())  # as Popen's close_fds: the server's pipes stay its own
        enter_netns(netns)
    except OSError as e:
        os.write(2, f"overlay start server: node daemon in {netns}: {e}\n".encode())
        os._exit(1)
    return 0


def _max_fd() -> int:
    try:
        return max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return 1024


class ForkedDaemon:
    """A daemon the start server forked, with the part of Popen's interface the testbed
    and its tests use (pid, poll, wait, terminate, kill, returncode)."""

    def __init__(self, server: StartServer, pid: int, args: Sequence[str]) -> None:
        self.server = server
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(REAP_INTERVAL)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)


class StartServer:
    """The testbed's end of one start server."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as errors:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                start_new_session=True,  # a Ctrl-C of up's process group is up's to handle
                env=env,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._to: IO[bytes] = self.proc.stdin
        self._from: IO[bytes] = self.proc.stdout

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            self._to.write(json.dumps(request).encode() + b"\n")
            self._to.flush()
            line = self._from.readline()
        except (OSError, ValueError):
            line = b""
        if not line:
            raise TestbedError(f"the daemons' start server exited: {log_tail(self.log)}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise TestbedError(f"the daemons' start server: {reply['error']}")
        return reply

    def start(self, daemons: Sequence[tuple[str, Sequence[str], Path]]) -> list[ForkedDaemon]:
        """For each (netns, ARGV, log): ``overlay ARGV`` in that namespace, its output
        appended to the log; all in one request."""
        starts = [{"netns": ns, "argv": list(argv), "log": str(log)} for ns, argv, log in daemons]
        pids = self._ask({"start": starts})["pids"]
        argvs = [argv for _, argv, _ in daemons]
        return [ForkedDaemon(self, int(pid), a) for pid, a in zip(pids, argvs, strict=True)]

    def exit_code(self, pid: int) -> int | None:
        if self.proc.poll() is not None:
            return None if pid_alive(pid) else -errno.ECHILD  # orphaned: its status is lost
        code = self._ask({"poll": pid})["code"]
        return None if code is None else int(code)

    def close(self) -> None:
        """End the server (its children live on, inherited by init)."""
        if self.proc.poll() is None:
            try:
                self._to.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._from.close()
