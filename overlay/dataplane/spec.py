"""What a dataplane is made of, as one value: the main process builds its own from it, and
hands it to each `--workers` process, which builds the same one (same class, options and
per-peer prefix) on its own TUN queue and socket."""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from control.peer_table import PeerTable
from encap import vxlan
from overlay.dataplane.counters import Counters
from overlay.dataplane.ipv6 import Ipv6Path
from overlay.dataplane.udp import UdpDataplane
from overlay.dataplane.vxlan import VxlanDataplane, vxlan6_prefix_for, vxlan_prefix_for
from tun.device import TunDevice


@dataclass(frozen=True)
class DataplaneSpec:
    framing: str  # "udp" (flannel's udp: the datagram is the packet) or "vxlan"
    subnet: IPv4Network  # our lease
    port: int  # the backend's UDP port
    mtu: int  # the TUN's
    offload: bool  # batching and offloads allowed (probed per socket and queue)
    tun_tso: bool  # take TCP super-packets from the TUN and cut them here
    busy_poll_us: int = 0  # after a wake-up, poll TUN and socket this long (0: off)
    vni: int = 0  # vxlan: ours
    mac: bytes = b""  # vxlan: our VTEP MAC
    subnet6: IPv6Network | None = None  # vxlan with EnableIPv6: our lease's IPv6 subnet
    mac6: bytes = b""  # vxlan with EnableIPv6: our IPv6 VTEP MAC (BackendV6Data's)

    def to_json(self) -> dict[str, Any]:
        return {
            "framing": self.framing,
            "subnet": str(self.subnet),
            "port": self.port,
            "mtu": self.mtu,
            "offload": self.offload,
            "tun_tso": self.tun_tso,
            "busy_poll_us": self.busy_poll_us,
            "vni": self.vni,
            "mac": vxlan.format_mac(self.mac) if self.mac else "",
            "subnet6": str(self.subnet6) if self.subnet6 is not None else "",
            "mac6": vxlan.format_mac(self.mac6) if self.mac6 else "",
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> DataplaneSpec:
        return cls(
            framing=str(value["framing"]),
            subnet=IPv4Network(value["subnet"]),
            port=int(value["port"]),
            mtu=int(value["mtu"]),
            offload=bool(value["offload"]),
            tun_tso=bool(value["tun_tso"]),
            busy_poll_us=int(value.get("busy_poll_us", 0)),
            vni=int(value.get("vni", 0)),
            mac=vxlan.parse_mac(value["mac"]) if value.get("mac") else b"",
            subnet6=IPv6Network(value["subnet6"]) if value.get("subnet6") else None,
            mac6=vxlan.parse_mac(value["mac6"]) if value.get("mac6") else b"",
        )

    def as_built(self, dataplane: UdpDataplane) -> DataplaneSpec:
        """This spec as ``dataplane`` turned out: TUNSETOFFLOAD is device-wide, so if the
        main process's queue takes TCP super-packets, every queue gets them, and every
        worker must cut them too."""
        return replace(self, tun_tso=dataplane.tso)

    def peer_table(self) -> PeerTable:
        """An empty peer table that precomputes this framing's per-peer prefix."""
        if self.framing == "vxlan":
            prefix6_for = vxlan6_prefix_for(self.vni, self.mac6) if self.mac6 else None
            return PeerTable(self.port, vxlan_prefix_for(self.vni, self.mac), prefix6_for)
        return PeerTable(self.port)


def build_dataplane(
    spec: DataplaneSpec,
    tun: TunDevice,
    sock: socket.socket,
    peers: PeerTable,
    counters: Counters,
    sock6: socket.socket | None = None,
) -> UdpDataplane:
    """The dataplane ``spec`` describes, on this TUN queue and socket (and, for vxlan's
    IPv6 half, ``sock6``, bound to our IPv6 underlay address)."""
    options: dict[str, Any] = {
        "offload": spec.offload,
        "tun_tso": spec.tun_tso,
        "mtu": spec.mtu,
        "busy_poll_us": spec.busy_poll_us,
    }
    if spec.framing == "vxlan":
        dataplane = VxlanDataplane(
            tun,
            sock,
            peers,
            spec.subnet,
            counters,
            vni=spec.vni,
            mac=spec.mac,
            vtep_ip=spec.subnet.network_address.packed,
            port=spec.port,
            **options,
        )
        if spec.subnet6 is not None and sock6 is not None:
            ipv6 = Ipv6Path(
                tun,
                sock6,
                peers,
                spec.subnet6,
                counters,
                vni=spec.vni,
                mac=spec.mac6,
                port=spec.port,
                icmp_limit=dataplane.icmp_limit,
                offload=dataplane.offload,
            )
            dataplane.attach_ipv6(ipv6)
        return dataplane
    return UdpDataplane(tun, sock, peers, spec.subnet, counters, **options)
