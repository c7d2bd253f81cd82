/* encap._native: TX, what a NIC's TSO engine does for the packets the TUN hands over
 * with TSO4 and CSUM offloads. Reference: encap/tso.py, rule for rule:
 *
 *   segment_tcp4, cut_tcp4 (check_tcp4,   segment_tcp4
 *     then cut_segments)
 *   segment_tcp6 (check_tcp6, then        segment_tcp6 (TSO6: vxlan's IPv6 half; the
 *     cut_segments)                        cut both share is _cut)
 *   partial_region                        partial_region
 *   finish_checksums, finish_regions      finish_checksums (finish_regions: its second
 *                                         loop, for regions already checked)
 *
 * Drains.tx (drains_send.c) calls cut_tcp4, partial_region and finish_regions directly.
 * tests/encap/test_native.py proves them equal to the reference (tests/encap/test_tso.py
 * checks the reference against scapy).
 */

/* struct virtio_net_hdr (encap.tso.VNET): flags, gso_type */
#define VNET_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4

/* -- segment_tcp4 ----------------------------------------------------------------------- */

/* Where a super-packet's headers and payload lie, as check_tcp4 found them. */
typedef struct {
    Py_ssize_t ip;              /* its IPv4 header: b[ip:] */
    Py_ssize_t ihl, headers;    /* the IPv4 header's length; IPv4 + TCP headers' */
    Py_ssize_t payload, count;  /* TCP payload bytes; segments of gso_size */
    int v6;                     /* an IPv6 header (ihl 40): no id, no header checksum */
} tcp_layout_t;

/* The first check of both families: prefix + packet lie inside the buffer (no
 * overflow: each comparison is against what is left). */
static inline const char *check_bounds(Py_ssize_t size, Py_ssize_t at, Py_ssize_t length,
                                       Py_ssize_t room, char *detail, size_t detail_size)
{
    detail[0] = 0;
    if (at < 0 || length < 0 || at > size || room > size - at || length > size - at - room) {
        snprintf(detail, detail_size, "length %zd at %zd", length, at);
        return "gso_bad_length";
    }
    return NULL;
}

/* The checks both families share once their headers are known: gso_size fits, and the
 * count segments fit in the buffer; NULL with *layout filled, else the reason. */
static inline const char *check_room(Py_ssize_t size, Py_ssize_t ip, Py_ssize_t length,
                                     Py_ssize_t gso_size, Py_ssize_t room, Py_ssize_t ihl,
                                     Py_ssize_t headers, int v6, tcp_layout_t *layout,
                                     char *detail, size_t detail_size)
{
    if (!(gso_size > 0 && gso_size <= 0xFFFF - headers)) {
        snprintf(detail, detail_size, "gso_size %zd", gso_size);
        return "gso_bad_size";
    }
    Py_ssize_t payload = length - headers;
    Py_ssize_t count = (payload + gso_size - 1) / gso_size;
    Py_ssize_t end = ip + length;
    /* count <= 65535 and room + headers < 2**31: no overflow in 64 bits */
    if ((count - 1) * (room + headers) + 3 > size - end) {
        snprintf(detail, detail_size, "%zd segments", count);
        return "gso_no_room";
    }
    *layout = (tcp_layout_t){.ip = ip, .ihl = ihl, .headers = headers, .payload = payload,
                              .count = count, .v6 = v6};
    return NULL;
}

/* The checks of encap.tso.segment_tcp4, before anything is written: NULL when the
 * super-packet at b[at + room:][:length] can be cut (*layout filled), else the CodecError
 * reason (detail filled). */
static inline const char *check_tcp4(const uint8_t *b, Py_ssize_t size, Py_ssize_t at,
                                     Py_ssize_t length, Py_ssize_t gso_size, Py_ssize_t room,
                                     tcp_layout_t *layout, char *detail, size_t detail_size)
{
    const char *bounds = check_bounds(size, at, length, room, detail, detail_size);
    if (bounds != NULL)
        return bounds;
    Py_ssize_t ip = at + room;
    if (length < 40 || b[ip] >> 4 != 4 || b[ip + 9] != 6)
        return "gso_not_tcp4";
    Py_ssize_t ihl = (b[ip] & 0x0F) * 4;
    if (ihl < 20 || ihl + 20 > length) {
        snprintf(detail, detail_size, "length %zd", length);
        return "gso_bad_headers";
    }
    Py_ssize_t headers = ihl + (b[ip + ihl + 12] >> 4) * 4;
    if (headers < ihl + 20 || headers >= length) {
        snprintf(detail, detail_size, "length %zd", length);
        return "gso_bad_headers";
    }
    if ((b[ip + 6] & 0x3F) || b[ip + 7])
        return "gso_fragment";
    return check_room(size, ip, length, gso_size, room, ihl, headers, 0, layout, detail,
                      detail_size);
}

/* The cut of a checked super-packet, in place: each segment prefix + IP + TCP header +
 * payload, back to back from at (out: count, stride, last). encap.tso._cut: IPv4 gets
 * its total length, id + i and header checksum, IPv6 its payload length. */
static inline void cut_segments(uint8_t *b, Py_ssize_t at, Py_ssize_t gso_size,
                                const uint8_t *prefix, Py_ssize_t room,
                                const tcp_layout_t *layout, Py_ssize_t out[3])
{
    Py_ssize_t ip = layout->ip, ihl = layout->ihl, headers = layout->headers;
    Py_ssize_t count = layout->count;
    uint8_t original[120]; /* IPv4 (<= 60) or IPv6 (40) + TCP (<= 60) headers */
    memcpy(original, b + ip, (size_t)headers);
    uint32_t ip_id = be16(original + 4);
    uint32_t seq = be32(original + ihl + 4);
    uint8_t flags = original[ihl + 13];
    uint32_t addresses = layout->v6 ? sum16(original + 8, 32) : sum16(original + 12, 8);
    Py_ssize_t stride = room + headers + gso_size;
    Py_ssize_t last = layout->payload - (count - 1) * gso_size;
    /* Last segment first: segment i's output never reaches below segment i-1's payload,
     * and each payload is summed and moved before its header is written over it. */
    for (Py_ssize_t i = count - 1; i >= 0; i--) {
        Py_ssize_t chunk = i == count - 1 ? last : gso_size;
        const uint8_t *source = b + ip + headers + i * gso_size;
        uint8_t *dest = b + at + i * stride;
        uint32_t chunk_sum = sum16(source, chunk);
        memmove(dest + room + headers, source, (size_t)chunk);
        uint8_t *h = dest + room;
        memcpy(h, original, (size_t)headers);
        uint32_t total = (uint32_t)(headers + chunk);
        if (layout->v6) {
            put16(h + 4, total - 40); /* the payload length */
        } else {
            put16(h + 2, total);
            put16(h + 4, (ip_id + (uint32_t)i) & 0xFFFF);
            put16(h + 10, 0);
            put16(h + 10, ~fold(sum16(h, ihl)) & 0xFFFF);
        }
        uint32_t s = seq + (uint32_t)(i * gso_size); /* modulo 2**32 */
        h[ihl + 4] = (uint8_t)(s >> 24);
        h[ihl + 5] = (uint8_t)(s >> 16);
        h[ihl + 6] = (uint8_t)(s >> 8);
        h[ihl + 7] = (uint8_t)s;
        uint8_t f = flags & (uint8_t)~(FIN | PSH | CWR);
        if (i == 0)
            f |= flags & CWR;
        if (i == count - 1)
            f |= flags & (FIN | PSH);
        h[ihl + 13] = f;
        put16(h + ihl + 16, 0);
        uint64_t tcp = (uint64_t)addresses + 6 + (total - (uint32_t)ihl)
                     + sum16(h + ihl, headers - ihl) + chunk_sum;
        put16(h + ihl + 16, ~fold((uint32_t)(tcp % 0xFFFF)) & 0xFFFF);
        memcpy(dest, prefix, (size_t)room);
    }
    out[0] = count;
    out[1] = stride;
    out[2] = room + headers + last;
}

/* The cut itself: NULL when done (count, stride, last set), else the CodecError reason
 * (detail filled). ``prefix`` must not lie in ``b``. */
static const char *cut_tcp4(uint8_t *b, Py_ssize_t size, Py_ssize_t at, Py_ssize_t length,
                            Py_ssize_t gso_size, const uint8_t *prefix, Py_ssize_t room,
                            Py_ssize_t out[3], char *detail, size_t detail_size)
{
    tcp_layout_t layout;
    const char *reason = check_tcp4(b, size, at, length, gso_size, room, &layout, detail,
                                    detail_size);
    if (reason == NULL)
        cut_segments(b, at, gso_size, prefix, room, &layout, out);
    return reason;
}

typedef const char *(*check_tcp_t)(const uint8_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                    Py_ssize_t, Py_ssize_t, tcp_layout_t *, char *, size_t);

/* segment_tcp4 and segment_tcp6: the arguments, the family's check, the cut. */
static PyObject *segment_tcp(PyObject *args, check_tcp_t check)
{
    Py_buffer buf, prefix;
    Py_ssize_t at, length, gso_size;
    if (!PyArg_ParseTuple(args, "w*nnny*", &buf, &at, &length, &gso_size, &prefix))
        return NULL;
    PyObject *result = NULL;
    char detail[96];
    Py_ssize_t out[3];
    tcp_layout_t layout;
    uint8_t *prefix_copy = PyMem_Malloc(prefix.len ? (size_t)prefix.len : 1); /* may alias buf */
    if (prefix_copy == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(prefix_copy, prefix.buf, (size_t)prefix.len);
    const char *reason = check(buf.buf, buf.len, at, length, gso_size, prefix.len, &layout,
                               detail, sizeof detail);
    if (reason != NULL) {
        raise_codec(reason, detail);
    } else {
        cut_segments(buf.buf, at, gso_size, prefix_copy, prefix.len, &layout, out);
        result = Py_BuildValue("nnn", out[0], out[1], out[2]);
    }
done:
    PyMem_Free(prefix_copy);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&prefix);
    return result;
}

static PyObject *segment_tcp4(PyObject *self, PyObject *args)
{
    return segment_tcp(args, check_tcp4);
}

/* -- segment_tcp6 ----------------------------------------------------------------------- */

/* The checks of encap.tso.segment_tcp6, before anything is written: NULL when the IPv6
 * super-packet at b[at + room:][:length] can be cut (*layout filled; ihl is the IPv6
 * header's 40), else the CodecError reason (detail filled). */
static inline const char *check_tcp6(const uint8_t *b, Py_ssize_t size, Py_ssize_t at,
                                     Py_ssize_t length, Py_ssize_t gso_size, Py_ssize_t room,
                                     tcp_layout_t *layout, char *detail, size_t detail_size)
{
    const char *bounds = check_bounds(size, at, length, room, detail, detail_size);
    if (bounds != NULL)
        return bounds;
    Py_ssize_t ip = at + room;
    if (length < 60 || b[ip] >> 4 != 6 || b[ip + 6] != 6)
        return "gso_not_tcp6";
    Py_ssize_t headers = 40 + (b[ip + 40 + 12] >> 4) * 4;
    if (headers < 60 || headers >= length) {
        snprintf(detail, detail_size, "length %zd", length);
        return "gso_bad_headers";
    }
    return check_room(size, ip, length, gso_size, room, 40, headers, 1, layout, detail,
                      detail_size);
}

static PyObject *segment_tcp6(PyObject *self, PyObject *args)
{
    return segment_tcp(args, check_tcp6);
}

/* -- finish_checksums ------------------------------------------------------------------- */

/* encap.tso.partial_region: where the packet of length bytes at at has its partial
 * checksum (virtio_net_hdr csum_start, csum_offset), as region = (start, end, field); 0
 * when that does not lie in the packet. */
static inline int partial_region(Py_ssize_t at, Py_ssize_t length, Py_ssize_t csum_start,
                                 Py_ssize_t csum_offset, Py_ssize_t region[3])
{
    Py_ssize_t start = at + csum_start, field = start + csum_offset, end = at + length;
    if (!(at < start && start <= field && field <= end - 2))
        return 0;
    region[0] = start;
    region[1] = end;
    region[2] = field;
    return 1;
}

typedef struct {
    Py_ssize_t start, end, field;
} region_t;

static PyObject *finish_checksums(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    PyObject *regions;
    if (!PyArg_ParseTuple(args, "w*O", &buf, &regions))
        return NULL;
    /* Our own tuple, each region read once into r: reading a region may run Python (a
     * sequence's iterator, an __index__) that changes the list or what it would read. */
    PyObject *seq = PySequence_Tuple(regions);
    PyObject *result = NULL;
    Py_ssize_t n = seq ? PyTuple_GET_SIZE(seq) : 0;
    region_t *r = seq ? PyMem_New(region_t, n ? (size_t)n : 1) : NULL;
    if (r == NULL) {
        if (seq != NULL)
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* all checked before anything is written */
        PyObject *item = PySequence_Tuple(PyTuple_GET_ITEM(seq, i));
        int ok = item != NULL
              && PyArg_ParseTuple(item, "nnn", &r[i].start, &r[i].end, &r[i].field);
        Py_XDECREF(item);
        if (!ok)
            goto done;
        /* start <= field, field + 2 <= end <= len(buf), without overflow */
        if (!(0 <= r[i].start && r[i].start <= r[i].field && r[i].field < r[i].end
              && r[i].end - r[i].field >= 2 && r[i].end <= buf.len)) {
            PyErr_Format(PyExc_ValueError, "checksum region (%zd, %zd, %zd) outside the buffer",
                         r[i].start, r[i].end, r[i].field);
            goto done;
        }
    }
    uint8_t *b = buf.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t c = ~fold(sum16(b + r[i].start, r[i].end - r[i].start)) & 0xFFFF;
        if (c == 0 && r[i].field - r[i].start == 6)
            c = 0xFFFF; /* UDP: 0 would mean "no checksum" */
        put16(b + r[i].field, c);
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(r);
    Py_XDECREF(seq);
    PyBuffer_Release(&buf);
    return result;
}

/* finish_checksums' second loop, for regions partial_region made (Drains.tx's). */
static inline void finish_regions(uint8_t *b, Py_ssize_t (*regions)[3], Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t *r = regions[i];
        uint32_t c = ~fold(sum16(b + r[0], r[1] - r[0])) & 0xFFFF;
        if (c == 0 && r[2] - r[0] == 6)
            c = 0xFFFF;
        put16(b + r[2], c);
    }
}
