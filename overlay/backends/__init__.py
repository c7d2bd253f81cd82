"""One module per flannel backend (udp, vxlan with its userspace and kernel datapaths,
host-gw) behind the interface in ``base``; ``manager`` picks one by name."""
