"""Impairment, our answer to netem: its words (spec), what it does to each packet (model,
sans-IO), and a node's rules per peer and direction (rules)."""
