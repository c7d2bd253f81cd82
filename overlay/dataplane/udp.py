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
from collections.abc import Callable

from overlay.dataplane import busy_poll
from overlay.dataplane.receive import ReceivePath
from overlay.dataplane.send import SendPath


class UdpDataplane(SendPath, ReceivePath):
    """flannel's udp framing: the datagram is the inner packet (``VxlanDataplane`` adds
    its prefix and its receive rules)."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        tx, rx = self.reader_callbacks()
        loop.add_reader(self.tun.fd, tx)
        loop.add_reader(self.sock.fileno(), rx)

    def reader_callbacks(self) -> tuple[Callable[[], object], Callable[[], object]]:
        """(TUN readable, socket readable): the native drains' C methods (no Python per
        wake-up; with a trace attached they hand the wake-up to the methods here), else
        these methods; with ``busy_poll_us`` each wrapped to poll both fds after its
        wake-up (``busy_poll``), without it the drains themselves."""
        drains = self._native_drains()
        if drains is not None:
            tx, rx = drains.tx, drains.rx
        else:
            tx = self.on_tun_readable
            rx = self.on_socket_readable_gro if self.gro else self.on_socket_readable
        if not self.busy_poll_us:
            return tx, rx
        tun_fd, sock_fd, window = self.tun.fd, self.sock.fileno(), self.busy_poll_us
        return (
            busy_poll.polling_after(tx, tun_fd, rx, sock_fd, window),
            busy_poll.polling_after(rx, sock_fd, tx, tun_fd, window),
        )

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.tun.fd)
        loop.remove_reader(self.sock.fileno())
        drains, self._drains = self._drains, None
        if drains is not None:  # its counts now; a start() after this makes a new one
            if drains.flush in self.counters.pending:
                self.counters.pending.remove(drains.flush)
            drains.flush()
