"""Following the underlay's MTU while the node runs.

flanneld reads the interface's MTU once, at start: lowered under a running node (an
operator, a cloud's DHCP, a tunnel added below), the overlay keeps its old MTU, and
packets between the new and the old limit are lost without an ICMP error, so path MTU
discovery never corrects. Here a change of the underlay's MTU, seen through the kernel's
link notifications (``overlay.kernel.reconcile.KernelWatch``, within a fraction of a
second) or at the next periodic check, is followed, down and up: the backend's devices
and datapath take the MTU it needs (``Backend.follow_underlay``), subnet.env is
rewritten with the new FLANNEL_MTU (pods added from then on get it), and the change is
logged once and counted (``mtu_changes`` in `overlay status`). Pods that exist keep
their interface's MTU: what they send that no longer fits is answered with ICMP
frag-needed, by the kernel for the packets it routes into the smaller device and by
the dataplane for those queued before, so their path MTU discovery converges.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from overlay.node.state import NodeState
from overlay.node.subnet_file import SubnetFileError, write_subnet_env
from tun import netlink

MIN_MTU = 68  # IPv4's (RFC 791); the kernel refuses less on a TUN or vxlan device


class MtuFollower:
    """Compares the underlay's MTU with the one the node runs on, and follows a change."""

    def __init__(self, node: NodeState) -> None:
        self.node = node
        self._task: asyncio.Task[None] | None = None
        self._again = False  # asked again while a check ran
        self._refused: int | None = None  # an underlay MTU too small to follow (said once)
        self._env_stale = False  # subnet.env could not be rewritten: tried at each check

    def check_soon(self) -> None:
        """Check soon, in a task of its own; calls while one runs make one more after it."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._checks())

    async def _checks(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            await self.check()

    async def check(self) -> None:
        node = self.node
        try:
            mtu = await asyncio.to_thread(netlink.interface_mtu, node.underlay.iface)
        except OSError:
            return  # the interface is gone for now: followed when it is back
        if mtu != node.underlay.mtu:
            await self._follow(mtu)
        elif self._env_stale:
            await self._write_env()

    async def _follow(self, underlay_mtu: int) -> None:
        node, backend = self.node, self.node.backend
        assert backend is not None
        was = node.underlay
        underlay = replace(was, mtu=underlay_mtu)
        mtu, mtu_was = backend.mtu_for(underlay), backend.mtu
        if mtu < MIN_MTU:
            if self._refused != underlay_mtu:
                self._refused = underlay_mtu
                node.log.error(
                    "underlay_mtu_too_small",
                    iface=underlay.iface,
                    underlay_mtu=underlay_mtu,
                    needs=underlay_mtu - mtu + MIN_MTU,
                    mtu=mtu_was,
                    effect="the overlay keeps its MTU: what no longer fits the underlay is lost",
                )
            return
        self._refused = None
        node.underlay = underlay
        try:
            await backend.follow_underlay(underlay)
        except Exception as e:  # noqa: BLE001 - the reconcile keeps trying (and says so)
            node.log.error("mtu_follow_failed", iface=underlay.iface, mtu=mtu, error=str(e))
        node.mtu_changes += 1
        node.log.warning(
            "underlay_mtu_changed",
            iface=underlay.iface,
            underlay_mtu=underlay_mtu,
            underlay_mtu_was=was.mtu,
            mtu=mtu,
            mtu_was=mtu_was,
        )
        for warning in backend.config_warnings():
            fields = dict(warning)
            if fields.pop("event") == "mtu_too_large":  # Backend.MTU no longer fits
                node.log.warning("mtu_too_large", **fields)
        if mtu != mtu_was:
            await self._write_env()

    async def _write_env(self) -> None:
        """subnet.env with the MTU pods get now; a failure is said once and tried again."""
        node = self.node
        path = node.options.subnet_file
        try:
            await asyncio.to_thread(write_subnet_env, path, node.subnet_env())
        except SubnetFileError as e:
            if not self._env_stale:
                node.log.error(
                    "subnet_env_not_rewritten",
                    path=str(path),
                    error=str(e),
                    effect="FLANNEL_MTU is stale until a later check manages it",
                )
            self._env_stale = True
            return
        if self._env_stale:
            node.log.info("subnet_env_rewritten", path=str(path))
        self._env_stale = False

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
