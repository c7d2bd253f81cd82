"""How much one wake-up of a drain moves, and the buffers sized for it."""

# Packets moved per wake-up before yielding to the loop (bounds the other direction's wait).
BUDGET = 256
MAX_DATAGRAM = 65535
# One drain's packets, back to back (BUDGET packets of a 1500-byte MTU fit with room).
TX_ARENA = 1024 * 1024
