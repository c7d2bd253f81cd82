"""flannel's udp backend: the datagram is the inner packet, forwarded by this process."""

from __future__ import annotations

from control.lease import Lease
from encap import udp_frame
from overlay.backends.userspace import UserspaceBackend
from overlay.dataplane.spec import DataplaneSpec


class UdpBackend(UserspaceBackend):
    # flanneld runs udp with EnableIPv6 without a word: it takes an IPv6 subnet, writes
    # FLANNEL_IPV6_SUBNET, and the pods' IPv6 addresses reach nothing. We say so instead.
    ipv6_refusal = (
        "flannel's udp backend is IPv4 only (flanneld would hand pods IPv6 addresses that "
        "nothing forwards): use vxlan (either datapath) or host-gw"
    )
    lease_type = ""  # flannel's udp backend publishes no BackendType
    name = "udp"
    overhead = udp_frame.OVERHEAD

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type in ("", "udp")

    def dataplane_spec(self, lease: Lease) -> DataplaneSpec:
        options = self.ctx.options
        return DataplaneSpec(
            framing="udp",
            subnet=lease.subnet,
            port=self.ctx.config.backend.port,
            mtu=self.mtu,
            offload=options.offload,
            tun_tso=options.tun_tso,
            busy_poll_us=options.busy_poll_us,
        )
