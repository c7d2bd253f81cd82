# Types of the C module encap._native, built from encap/csrc/ (encap.tso, encap.gso, Drains,
# poll_after).
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

Buffer = bytes | bytearray | memoryview
Subnet = tuple[int, int]

RX_REASONS: tuple[str, ...]
MAX_RUN: int

def segment_tcp4(
    buf: bytearray | memoryview, at: int, length: int, gso_size: int, prefix: Buffer
) -> tuple[int, int, int]: ...
def segment_tcp6(
    buf: bytearray | memoryview, at: int, length: int, gso_size: int, prefix: Buffer
) -> tuple[int, int, int]: ...
def finish_checksums(buf: bytearray | memoryview, regions: list[tuple[int, int, int]]) -> None: ...
def valid_pieces6(
    data: bytearray | memoryview,
    size: int,
    segment: int,
    sources: Sequence[tuple[int, int]],
    destination: tuple[int, int],
    drops: MutableMapping[str, int],
    vxlan: tuple[bytes, bytes, bytes],
    ndp: list[int],
) -> list[tuple[int, int]]: ...
def plan_tun_writes6(
    data: bytearray | memoryview, pieces: Sequence[tuple[int, int]], mtu: int
) -> list[tuple[list[bytes], int, int]]: ...
def drop_reason(
    data: bytearray | memoryview,
    start: int,
    end: int,
    sources: Sequence[Subnet],
    destination: Subnet,
) -> str | None: ...
def valid_pieces(
    data: bytearray | memoryview,
    size: int,
    segment: int,
    sources: Sequence[Subnet],
    destination: Subnet,
    drops: MutableMapping[str, int],
    vxlan: tuple[bytes, bytes] | None = None,
    arp: list[int] | None = None,
    mtu: int = 0,
) -> list[tuple[int, int]]: ...
def plan_tun_writes(
    data: bytearray | memoryview,
    size: int,
    segment: int,
    sources: Sequence[Subnet],
    destination: Subnet,
    drops: MutableMapping[str, int],
    vxlan: tuple[bytes, bytes] | None = None,
    arp: list[int] | None = None,
    mtu: int = 0,
) -> list[tuple[list[bytes], int, int]]: ...
def poll_after(
    first: Callable[[], object],
    first_fd: int,
    other: Callable[[], object],
    other_fd: int,
    window_ns: int,
) -> int: ...

class Drains:
    def __init__(self, dataplane: Any, budget: int) -> None: ...
    def tx(self) -> None: ...
    def rx(self) -> None: ...
    def flush(self) -> None: ...

def plan_groups(
    lengths: Sequence[int], keys: Sequence[object], max_segments: int = 64, max_bytes: int = 65000
) -> list[tuple[int, int]]: ...
