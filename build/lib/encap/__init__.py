"""encap."""
