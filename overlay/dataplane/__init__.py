"""The userspace datapath: the udp and vxlan drains (send, receive), the --workers
processes, counters."""
