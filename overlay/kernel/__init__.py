"""What the node programs into the kernel and keeps true: links, addresses, routes,
neighbours and fdb entries, and flanneld's iptables rules."""
