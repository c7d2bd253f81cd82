"""``overlay testbed capture``: one pcapng of several nodes' interfaces (each node's
underlay ``eth0`` and its overlay device: ``flannel0``, or ``flannel.<VNI>`` on a kernel
vxlan node), every interface named ``<node>:<ifname>`` in the file, as ``containerlab
capture`` does.

A ``tcpdump -w -`` per interface in its node's namespace (the kernel's own capture, so
kernel datapaths are seen too, unlike ``overlay trace``); their pcap streams are read
side by side, and the packets merged by time into pcapng with ``encap.pcapng``'s writer
(one Interface Description Block per interface, with its link type and name). The file
is created 0600: it holds the bed's traffic.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from encap import pcapng
from overlay.lab.errors import TestbedError
from overlay.lab.netns import exec_argv, run_in

PCAP_MAGIC_NS = 0xA1B23C4D  # tcpdump --time-stamp-precision nano
PCAP_MAGIC_US = 0xA1B2C3D4
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
OVERLAY_DEVICES = ("flannel0", "flannel.1")  # userspace, then the kernel's (VNI 1)


@dataclass
class Interface:
    """One capture point and what its tcpdump has delivered so far."""

    node: str
    netns: str
    ifname: str
    linktype: int = 1
    packets: list[tuple[int, bytes, int]] = field(default_factory=list)  # (ns, data, length)

    @property
    def name(self) -> str:
        return f"{self.node}:{self.ifname}"


def interfaces_of(node: str, netns: str, wanted: tuple[str, ...] | None) -> list[Interface]:
    """The capture points of one node: ``wanted`` (checked to exist), else eth0 and its
    overlay device."""
    present = set(
        run_in(netns, ["ls", "/sys/class/net"], capture_output=True, text=True).stdout.split()
    )
    if wanted:
        missing = [name for name in wanted if name not in present]
        if missing:
            raise TestbedError(
                f"{node} has no interface {missing[0]} (it has {', '.join(sorted(present))})"
            )
        names = list(wanted)
    else:
        names = ["eth0", *[d for d in OVERLAY_DEVICES if d in present][:1]]
    return [Interface(node, netns, name) for name in names]


def _read_pcap(stream: IO[bytes], interface: Interface) -> None:
    """Fill ``interface.packets`` from a tcpdump's pcap stream until it ends."""
    header = stream.read(_GLOBAL.size)
    if len(header) < _GLOBAL.size:
        return
    magic, _, _, _, _, _, linktype = _GLOBAL.unpack(header)
    scale = 1 if magic == PCAP_MAGIC_NS else 1000
    interface.linktype = linktype
    while True:
        record = stream.read(_RECORD.size)
        if len(record) < _RECORD.size:
            return
        seconds, fraction, captured, length = _RECORD.unpack(record)
        data = stream.read(captured)
        if len(data) < captured:
            return
        interface.packets.append((seconds * 1_000_000_000 + fraction * scale, data, length))


def capture(
    interfaces: list[Interface],
    seconds: float,
    count: int | None,
    snaplen: int,
    bpf: list[str],
) -> None:
    """Run a tcpdump per interface for ``seconds`` (or until ``count`` packets in all)."""
    procs: list[subprocess.Popen[bytes]] = []
    readers = []
    try:
        for interface in interfaces:
            argv = ["tcpdump", "-i", interface.ifname, "-w", "-", "-U", "-n", "-s", str(snaplen)]
            argv += ["--time-stamp-precision", "nano", *bpf]
            proc = subprocess.Popen(
                exec_argv(interface.netns, argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
            procs.append(proc)
            assert proc.stdout is not None
            reader = threading.Thread(target=_read_pcap, args=(proc.stdout, interface), daemon=True)
            reader.start()
            readers.append(reader)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if count and sum(len(i.packets) for i in interfaces) >= count:
                break
            if any(proc.poll() is not None for proc in procs):
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # tcpdump flushes and exits
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for reader in readers:
            reader.join(timeout=5)
    failed = [
        i.name for i, p in zip(interfaces, procs, strict=False) if p.returncode not in (0, -2)
    ]
    if failed and not any(i.packets for i in interfaces):
        raise TestbedError(f"tcpdump failed on {', '.join(failed)} (is tcpdump installed?)")


def to_pcapng(interfaces: list[Interface], count: int | None, snaplen: int) -> tuple[bytes, int]:
    """One pcapng: an interface per capture point, the packets of all merged by time
    (the first ``count``). Returns it and the number of packets."""
    blocks = [pcapng.section_header(application="overlay testbed capture", os=os.uname().sysname)]
    blocks += [
        pcapng.interface_description(interface.linktype, snaplen=snaplen, name=interface.name)
        for interface in interfaces
    ]
    merged = sorted(
        (ts, index, data, length)
        for index, interface in enumerate(interfaces)
        for ts, data, length in interface.packets
    )
    if count:
        merged = merged[:count]
    blocks += [
        pcapng.enhanced_packet(index, ts, data, original_length=length)
        for ts, index, data, length in merged
    ]
    return b"".join(blocks), len(merged)


def write_private(path: Path, data: bytes) -> None:
    """``data`` into a new file only root can read (replacing a file of ours there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there keeps its mode otherwise
    with os.fdopen(fd, "wb") as out:
        out.write(data)
