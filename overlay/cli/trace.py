"""`overlay trace`: capture what crosses a running daemon, as pcapng, like tcpdump.

The front end sends one request line on the status socket (``trace {"filter": ...,
"count": ..., "snaplen": ...}``) and copies the pcapng stream the daemon answers to a
file, to stdout, or as one line per packet to the terminal (``overlay.observe.trace``
is the daemon's side).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import IO

from encap import pcapng
from overlay.cli.parser import OneLineParser
from overlay.observe import trace_filter
from overlay.observe.status_socket import default_path
from overlay.observe.trace import (
    DEFAULT_SNAPLEN,
    MAX_SNAPLEN,
    OUTER,
    describe,
    outer_parts,
    vxlan_inner,
)

PROG = "overlay trace"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Capture what crosses a running daemon (inner packets at the TUN, outer "
        "datagrams, drops with their reason) as pcapng, like tcpdump. FILTER words: host, "
        "src, dst, net (IPv4 or IPv6), port, ip, ip6, icmp, icmp6, tcp, udp, proto N, peer, "
        "inner, outer, in, out, drop, reason NAME; and, or, not, parentheses. Needs root "
        "(the socket is 0600).",
    )
    p.add_argument(
        "--status-socket",
        default=os.environ.get("FLANNELD_STATUS_SOCKET") or str(default_path()),
        help="the daemon's status socket (default: this network namespace's, as `overlay "
        "run` chooses it; FLANNELD_STATUS_SOCKET also sets it)",
    )
    p.add_argument("-c", dest="count", type=_count, default=0, help="stop after COUNT packets")
    p.add_argument(
        "-s",
        dest="snaplen",
        type=_snaplen,
        default=DEFAULT_SNAPLEN,
        help=f"keep at most SNAPLEN bytes of each packet (default {DEFAULT_SNAPLEN})",
    )
    p.add_argument(
        "-w",
        dest="write",
        metavar="FILE",
        default=None,
        help="write pcapng to FILE (created 0600), or to stdout with '-' (for `| tshark -r -`);"
        " without it one line per packet is printed",
    )
    p.add_argument("filter", nargs="*", help="filter expression (see above)")
    return p


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a packet count (1 or more)")
    return int(text)


def _snaplen(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_SNAPLEN:
        raise argparse.ArgumentTypeError(f"{text!r} is not a snap length (1 to {MAX_SNAPLEN})")
    return int(text)


class OutputError(Exception):
    """What the capture is written to failed (a full disk): the message names it."""


@contextlib.contextmanager
def _writing(name: str) -> Iterator[None]:
    """An OSError of a write to ``name`` as OutputError (a reader that went away, a
    BrokenPipeError, stays itself: it ends the capture quietly)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {name}: {e.strerror or e}") from None


class _Pcapng:
    """The stream as it comes, to a file or to stdout (``-w``)."""

    def __init__(self, out: IO[bytes], owned: bool, name: str) -> None:
        self.out = out
        self.owned = owned  # a file we opened: closed at the end
        self.name = name

    def chunk(self, data: bytes) -> None:
        with _writing(self.name):
            self.out.write(data)
            self.out.flush()

    def block(self, kind: int, block: bytes) -> None:
        pass

    def close(self) -> None:
        """Closed in any case; a failure to write the rest was said by ``chunk``."""
        if self.owned:
            with contextlib.suppress(OSError):
                self.out.close()


class _Summary:
    """One line per packet, for a terminal (what tcpdump prints without -w)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.names: list[str] = []
        self.vxlan = False

    def chunk(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def block(self, kind: int, block: bytes) -> None:
        if kind == pcapng.BLOCK_IDB:
            self.names.append(_idb_name(block) or f"if{len(self.names)}")
        elif kind == pcapng.BLOCK_EPB:
            with _writing("standard output"):
                self.out.write(self.line(block) + "\n")
                self.out.flush()

    def line(self, block: bytes) -> str:
        interface, ts, data, length, options = pcapng.parse_packet(block)
        stamp = datetime.fromtimestamp(ts / 1e9).strftime("%H:%M:%S.%f")
        flags = options.get(pcapng.EPB_FLAGS, [b"\0\0\0\0"])[0]
        way = {1: "In ", 2: "Out"}.get(int.from_bytes(flags[:4], "little") & 3, "   ")
        name = self.names[interface] if interface < len(self.names) else str(interface)
        text = f"{stamp} {name} {way} "
        parts = outer_parts(data) if interface == OUTER else None
        if parts is not None:
            src, sport, dst, dport, inner = parts
            text += f"{src}.{sport} > {dst}.{dport}: "
            packet = vxlan_inner(inner)
            if packet is not None:
                text += "VXLAN, "
            text += describe(inner if packet is None else packet)
        else:
            text += describe(data)
        text += f", length {length}"
        for comment in options.get(pcapng.OPT_COMMENT, []):
            text += f" [{comment.decode(errors='replace')}]"
        return text


def _idb_name(block: bytes) -> str | None:
    """The if_name option of an Interface Description Block."""
    names = pcapng.block_options(block, 16).get(pcapng.IF_NAME)
    return names[0].decode(errors="replace") if names else None


def request_line(count: int, snaplen: int, text: str) -> bytes:
    body = json.dumps({"filter": text, "count": count, "snaplen": snaplen})
    return f"trace {body}\n".encode()


def _fail(message: str, status: int = 1) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return status


def _connect(path: str, request: bytes) -> socket.socket | None:
    """The status socket with the trace request sent, or None (said on stderr)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(request)
    except OSError as e:
        _fail(f"no daemon answers on {path} ({e.strerror or e})")
        sock.close()
        return None
    return sock


def _output(write: str | None) -> _Pcapng | _Summary:
    """Where the stream goes: a file (created 0600), stdout (``-``) or the summary lines.
    OSError when the file cannot be made."""
    if write == "-":
        return _Pcapng(sys.stdout.buffer, owned=False, name="standard output")
    if write:
        fd = os.open(write, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return _Pcapng(os.fdopen(fd, "wb"), owned=True, name=write)
    return _Summary(sys.stdout)


def _copy(sock: socket.socket, first: bytes, out: _Pcapng | _Summary, counts: list[int]) -> None:
    """Copy the stream until the daemon ends it, counting [packets captured, missed]."""
    reader = pcapng.BlockReader()
    chunk = first
    while chunk:
        out.chunk(chunk)
        for kind, block in reader.feed(chunk):
            if kind == pcapng.BLOCK_EPB:
                counts[0] += 1
            elif kind == pcapng.BLOCK_ISB:
                counts[1] += _isb_dropped(block)
            out.block(kind, block)
        chunk = sock.recv(65536)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    text = " ".join(args.filter)
    try:
        trace_filter.parse(text)
    except trace_filter.FilterError as e:
        return _fail(str(e), 2)
    sock = _connect(args.status_socket, request_line(args.count, args.snaplen, text))
    if sock is None:
        return 1

    def interrupted(*_: object) -> None:  # Ctrl-C ends the capture like tcpdump's
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    signal.signal(signal.SIGINT, interrupted)
    out: _Pcapng | _Summary | None = None
    counts = [0, 0]
    try:
        first = sock.recv(65536)
        if first.startswith(b"error:"):
            sys.stderr.write(f"{PROG}: {first.decode(errors='replace').strip()}\n")
            return 1
        try:
            out = _output(args.write)
        except OSError as e:
            return _fail(f"cannot write {args.write}: {e.strerror}")
        # The daemon sends the file header once the trace is attached: from now on
        # nothing is missed.
        sys.stderr.write(f"{PROG}: capturing on {args.status_socket}\n")
        sys.stderr.flush()
        _copy(sock, first, out, counts)
    except BrokenPipeError:  # `-w - | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OutputError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(str(e.strerror or e))
    except ValueError as e:
        return _fail(f"the daemon sent a broken stream ({e})")
    finally:
        sock.close()
        if out is not None:
            out.close()
    packets, missed = counts
    note = f", {missed} missed (the reader was too slow)" if missed else ""
    sys.stderr.write(f"{PROG}: {packets} packets captured{note}\n")
    return 0


def _isb_dropped(block: bytes) -> int:
    """The isb_ifdrop option of an Interface Statistics Block (0 when absent)."""
    dropped = [v for v in pcapng.block_options(block, 20).get(pcapng.ISB_IFDROP, []) if len(v) == 8]
    return int.from_bytes(dropped[0], "little") if dropped else 0
