"""`overlay testbed capture`'s merge (overlay.lab.capture): tcpdump's pcap streams in,
one pcapng out with an interface per capture point, named and typed, packets by time."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from overlay.lab.capture import PCAP_MAGIC_NS, Interface, _read_pcap, to_pcapng, write_private

PING = bytes.fromhex(  # IPv4 ICMP echo 198.18.1.2 -> 198.18.2.2
    "450000540000400040010000c6120102c6120202" + "08000000000000000000" + "00" * 54
)


def pcap(linktype: int, packets: list[tuple[int, bytes]]) -> bytes:
    """What `tcpdump -w - --time-stamp-precision nano` writes."""
    out = struct.pack("<IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0, 262144, linktype)
    for ns, data in packets:
        out += struct.pack("<IIII", ns // 10**9, ns % 10**9, len(data), len(data)) + data
    return out


def test_streams_merge_by_time_with_each_interface_named(tmp_path: Path) -> None:
    eth = Interface("n1", "x-n1", "eth0")
    tun = Interface("n2", "x-n2", "flannel0")
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + PING
    _read_pcap(io.BytesIO(pcap(1, [(1_000_000_002, frame), (1_000_000_004, frame)])), eth)
    # A stream cut mid-record (tcpdump stopped) keeps what was whole.
    _read_pcap(io.BytesIO(pcap(101, [(1_000_000_003, PING)]) + b"\x00" * 7), tun)
    assert (eth.linktype, tun.linktype) == (1, 101)
    data, count = to_pcapng([eth, tun], None, 262144)
    assert count == 3
    out = tmp_path / "bed.pcapng"
    out.write_bytes(b"old")
    out.chmod(0o644)
    write_private(out, data)
    assert out.stat().st_mode & 0o777 == 0o600 and out.read_bytes() == data
    if shutil.which("tshark") is None:
        pytest.skip("needs tshark (`make setup`) to read the file back")
    fields = subprocess.run(
        [
            "tshark",
            "-r",
            str(out),
            "-T",
            "fields",
            "-e",
            "frame.interface_name",
            "-e",
            "frame.time_epoch",
            "-e",
            "ip.dst",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    rows = [line.split("\t") for line in fields if line]
    assert [r[0] for r in rows] == ["n1:eth0", "n2:flannel0", "n1:eth0"]
    assert [r[1] for r in rows] == ["1.000000002", "1.000000003", "1.000000004"]
    assert {r[2] for r in rows} == {"198.18.2.2"}


def test_count_keeps_the_first_packets_in_time() -> None:
    eth = Interface("n1", "x-n1", "eth0", packets=[(5, b"a", 1), (1, b"b", 1)])
    data, count = to_pcapng([eth], 1, 65535)
    assert count == 1 and b"b" in data[-40:]
