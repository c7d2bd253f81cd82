"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

``int.from_bytes`` folds the whole buffer in C, far faster than a loop over 16-bit words
(bench/results/design-measurements.md).
"""


def ones_complement_sum(data: bytes | bytearray | memoryview) -> int:
    """16-bit one's complement sum of ``data`` (odd lengths padded with a zero byte)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = int.from_bytes(data, "big")
    # 2**16 == 1 (mod 0xFFFF): the sum of all 16-bit words is congruent to the big integer.
    folded = total % 0xFFFF
    if folded == 0 and total != 0:
        return 0xFFFF
    return folded


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The checksum to store in a header whose checksum field is zero in ``data``."""
    return ~ones_complement_sum(data) & 0xFFFF


def incremental_update(checksum: int, old_word: int, new_word: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one changed 16-bit word."""
    total = (~checksum & 0xFFFF) + (~old_word & 0xFFFF) + (new_word & 0xFFFF)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
