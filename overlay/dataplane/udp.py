"""flannel's udp backend: TUN <-> UDP socket, one inner IPv4 packet per datagram.

The two handlers (``send.SendPath``, ``receive.ReceivePath``; what they share is in
``base``) are drain loops registered with ``loop.add_reader``: each callback moves
every queued packet (up to a budget, so the other direction is not starved) instead of one
packet per wake-up. Each handler is a few stages, one method each; the per-packet rules
(GSO grouping, receive validation, TCP coalescing) are sans-IO functions in ``encap.gso``.

With ``offload`` (the default) the kernel batches for us (UDP GSO and GRO, TCP
super-packets through the TUN: ``send`` and ``receive`` say how), while every datagram on
the wire stays one inner IPv4 packet no larger than the TUN MTU, so flannel's C proxy and
kernel peers still interoperate.

Everything is probed once; without it (old kernel, ``--no-offload``) the plain per-packet
``sendto``/``recvfrom_into``/``write`` path runs. ``features()`` says what is active.

When the native module loaded (``native``, ``encap.native``) the reader callbacks that
``start()`` registers are C methods, ``native.Drains``' ``tx`` and ``rx``: the whole
wake-up (reads, routing, cutting, GSO planning, sends; receives, gathering, validation,
TUN writes; the counts) without Python but for the rare events that need it (a packet
without a route, an ARP request, a drop). The Python stages below are the same steps
written out: the reference, the path a trace takes (``tap``: ``Drains`` hands such a
wake-up to these methods) and the path without the module; the unit tests run both and
compare them.

At a low packet rate every Python object a wake-up touches is a cache miss, so a
``Drains`` (made at the first ``start()``, dropped at ``stop()``) reads the dataplane's
fixed attributes once: the fds, the vnet header, headroom, tso, gro, tun_gso, mtu, our
subnet, the vxlan rules, the peer table, the counters and the two buffers (exported for
its lifetime). Per wake-up it reads only what may change: ``tap``, ``gso`` (TX) and the
peer table's ``routes`` and ``senders``; it keeps its last route and sender lookups while
those two are the same objects (``PeerTable`` swaps both on every change, so a changed
lease is used at the next wake-up). Its counts stay in C and reach ``counters`` and the
peers' ``PeerStats`` at ``flush()``: at the end of a wake-up when the last flush is a
second old, from every ``Counters.snapshot()`` / ``settle()`` (the dataplane puts
``flush`` in ``counters.pending``), and at ``stop()``; drops are added at once.

What each of these choices bought is in bench/results/design-measurements.md.
"""

from __future__ import annotations

import asyncio

from overlay.dataplane.impaired import ImpairPath


class UdpDataplane(ImpairPath):
    """flannel's udp framing: the datagram is the inner packet (``VxlanDataplane`` adds
    its prefix and its receive rules)."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._register(loop)  # sets self._loop

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._unregister(loop)  # clears self._loop
        self._retire_drains()

    def set_mtu(self, mtu: int) -> None:
        """The TUN's MTU changed (the underlay's did): longer packets read from the TUN get
        frag-needed with it, received TCP packets longer than it go in as segments of it.
        A Drains reads the MTU once, when made: a running one is replaced (its readers
        with it, between two wake-ups; nothing queued is lost)."""
        self.mtu = mtu
        had_drains = self._retire_drains()
        if had_drains and self._loop is not None:
            self._register(self._loop)

    def _retire_drains(self) -> bool:
        """Add the native drains' counts now and drop them (a start() makes new ones):
        whether there were any."""
        drains, self._drains = self._drains, None
        if drains is None:
            return False
        if drains.flush in self.counters.pending:
            self.counters.pending.remove(drains.flush)
        drains.flush()
        return True
