"""What the node programs into the kernel and keeps true: links, addresses, routes,
neighbours and fdb entries, and flanneld's ip-masq and FORWARD rules (iptables or nftables)."""
