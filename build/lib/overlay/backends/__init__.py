"""Backends: how packets read from the TUN reach a peer (udp now; vxlan, host-gw later)."""
