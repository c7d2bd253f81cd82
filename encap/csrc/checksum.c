/* encap._native: the Internet checksum (RFC 1071) sum every codec here uses.
 * Reference: encap/checksum.py (ones_complement_sum; internet_checksum is ~fold(sum16)),
 * and the _sum / _fold of encap/tso.py and encap/gso.py, which sum the same way.
 */

/* The big-endian 16-bit words of p[0:n] (an odd end padded with zero) summed modulo
 * 0xFFFF, as 0..0xFFFE. Summed in native order, 8 bytes at a time: 2**16 == 1 modulo
 * 0xFFFF, so a 32-bit word counts as its two 16-bit halves, and a byte-swapped word is the
 * word times 256. */
static uint32_t sum16(const uint8_t *p, Py_ssize_t n)
{
    uint64_t acc = 0;
    while (n >= 32) {
        uint64_t w[4];
        memcpy(w, p, 32);
        acc += (w[0] & 0xFFFFFFFFu) + (w[0] >> 32) + (w[1] & 0xFFFFFFFFu) + (w[1] >> 32)
             + (w[2] & 0xFFFFFFFFu) + (w[2] >> 32) + (w[3] & 0xFFFFFFFFu) + (w[3] >> 32);
        p += 32;
        n -= 32;
    }
    while (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        acc += w;
        p += 4;
        n -= 4;
    }
    while (n >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        acc += w;
        p += 2;
        n -= 2;
    }
    if (n > 0) {
        uint16_t w = 0;
        memcpy(&w, p, 1); /* the first byte of a zero-padded word, in native order */
        acc += w;
    }
    uint32_t m = (uint32_t)(acc % 0xFFFF);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    m = (m * 256u) % 0xFFFF;
#endif
    return m;
}

/* A residue modulo 0xFFFF as a one's complement sum: 1..0xFFFF. */
static inline uint32_t fold(uint32_t residue)
{
    return residue ? residue : 0xFFFF;
}
