"""What the dataplane shows a packet trace (`overlay trace`), and nothing else.

A dataplane has ``tap: Tap | None``, None unless a trace is attached. The drain loops test
it once per wake-up, never per packet, so an unattached trace costs nothing; while one is
attached they may take a slower path that reports every packet. Buffers passed are only
valid during the call: a tap copies what it keeps.

- ``inner``: an inner IPv4 packet, ``"tx"`` as it leaves towards a peer (one packet per
  datagram: a TUN super-packet is reported as the segments it was cut into), ``"rx"`` as
  written into the TUN (one per datagram, before any coalescing into a super-packet).
- ``outer``: a UDP payload (flannel's udp: the packet; vxlan: VXLAN header + Ethernet
  frame), ``"tx"`` sent to ``peer`` or ``"rx"`` received from it; ``peer`` is the
  (address, port) the datagram went to or came from.
- ``drop``: something not forwarded, with the reason it is counted under (the keys of
  ``Counters.drops``); ``data`` is the datagram payload (``rx_*``) or the packet read from
  the TUN (``tx_*``); ``peer`` as above, None for packets read from the TUN.
"""

from __future__ import annotations

from typing import Literal, Protocol

Buffer = bytes | bytearray | memoryview
Direction = Literal["tx", "rx"]


class Tap(Protocol):
    def inner(self, direction: Direction, packet: Buffer) -> None: ...

    def outer(self, direction: Direction, datagram: Buffer, peer: tuple[str, int]) -> None: ...

    def drop(self, reason: str, data: Buffer, peer: tuple[str, int] | None) -> None: ...
