/* encap._native: the dataplane's per-byte and per-packet work in C.
 *
 * Each function here implements exactly the rules of a pure-Python function in encap/
 * (the reference and test oracle; tests/test_native.py proves them equal byte for byte):
 *
 *   segment_tcp4, finish_checksums      encap.tso   (TX: TSO segmentation, checksums)
 *   drop_reason, valid_pieces,          encap.gso   (RX: validation, TUN write plan)
 *   plan_tun_writes
 *   deliver                             encap.gso.plan_tun_writes / valid_pieces + the
 *                                       TUN writes of overlay.backends.udp, in one call
 *
 * Every offset and length is checked against the buffer before it is used; nothing here
 * reads or writes outside the buffers it is given, whatever the input.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* -- checksums ------------------------------------------------------------------------ */

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

static inline uint32_t be16(const uint8_t *p)
{
    return (uint32_t)p[0] << 8 | p[1];
}

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* -- errors ----------------------------------------------------------------------------- */

static PyObject *codec_error; /* encap.errors.CodecError */

static PyObject *raise_codec(const char *reason, const char *detail)
{
    PyObject *err = PyObject_CallFunction(codec_error, "ss", reason, detail);
    if (err != NULL) {
        PyErr_SetObject(codec_error, err);
        Py_DECREF(err);
    }
    return NULL;
}

/* -- TX: segment_tcp4 ------------------------------------------------------------------- */

#define FIN 0x01
#define PSH 0x08
#define ACK 0x10
#define CWR 0x80

/* The cut itself: NULL when done (count, stride, last set), else the CodecError reason
 * (detail filled). ``prefix`` must not lie in ``b``. */
static const char *cut_tcp4(uint8_t *b, Py_ssize_t size, Py_ssize_t at, Py_ssize_t length,
                            Py_ssize_t gso_size, const uint8_t *prefix, Py_ssize_t room,
                            Py_ssize_t out[3], char *detail, size_t detail_size)
{
    detail[0] = 0;
    if (at < 0 || length < 0 || at > size || room > size - at || length > size - at - room) {
        snprintf(detail, detail_size, "length %zd at %zd", length, at);
        return "gso_bad_length";
    }
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
    uint8_t original[120]; /* IPv4 (<= 60) + TCP (<= 60) headers */
    memcpy(original, b + ip, (size_t)headers);
    uint32_t ip_id = be16(original + 4);
    uint32_t seq = be32(original + ihl + 4);
    uint8_t flags = original[ihl + 13];
    uint32_t addresses = sum16(original + 12, 8);
    Py_ssize_t stride = room + headers + gso_size;
    Py_ssize_t last = payload - (count - 1) * gso_size;
    /* the GIL is kept: see the module docstring */
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
        put16(h + 2, total);
        put16(h + 4, (ip_id + (uint32_t)i) & 0xFFFF);
        put16(h + 10, 0);
        put16(h + 10, ~fold(sum16(h, ihl)) & 0xFFFF);
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
    return NULL;
}

static PyObject *segment_tcp4(PyObject *self, PyObject *args)
{
    Py_buffer buf, prefix;
    Py_ssize_t at, length, gso_size;
    if (!PyArg_ParseTuple(args, "w*nnny*", &buf, &at, &length, &gso_size, &prefix))
        return NULL;
    PyObject *result = NULL;
    char detail[96];
    Py_ssize_t out[3];
    uint8_t *prefix_copy = PyMem_Malloc(prefix.len ? (size_t)prefix.len : 1); /* may alias buf */
    if (prefix_copy == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(prefix_copy, prefix.buf, (size_t)prefix.len);
    const char *reason = cut_tcp4(buf.buf, buf.len, at, length, gso_size, prefix_copy,
                                  prefix.len, out, detail, sizeof detail);
    if (reason != NULL)
        raise_codec(reason, detail);
    else
        result = Py_BuildValue("nnn", out[0], out[1], out[2]);
done:
    PyMem_Free(prefix_copy);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&prefix);
    return result;
}

/* -- TX: plan_groups (encap.gso.plan_groups) --------------------------------------------- */

/* A group's byte total: the reference sums Python ints, which never wrap. */
#ifdef __SIZEOF_INT128__
typedef __int128 total_t;
#else
typedef long long total_t; /* Py_ssize_t is 32 bits where there is no __int128 */
#endif

static PyObject *plan_groups(PyObject *self, PyObject *args)
{
    PyObject *lengths_in, *keys_in;
    Py_ssize_t max_segments = 64, max_bytes = 65000;
    if (!PyArg_ParseTuple(args, "OO|nn", &lengths_in, &keys_in, &max_segments, &max_bytes))
        return NULL;
    PyObject *lengths = PySequence_Fast(lengths_in, "lengths must be a sequence");
    PyObject *keys = lengths ? PySequence_Fast(keys_in, "keys must be a sequence") : NULL;
    PyObject *groups = keys ? PyList_New(0) : NULL, *result = NULL;
    PyObject *group_key = NULL; /* owned: a key's __eq__ may drop it from the list */
    if (groups == NULL)
        goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(lengths);
    if (PySequence_Fast_GET_SIZE(keys) < count) {
        PyErr_SetString(PyExc_IndexError, "fewer keys than lengths");
        goto done;
    }
    if (count == 0) {
        result = Py_NewRef(groups);
        goto done;
    }
    PyObject **len = PySequence_Fast_ITEMS(lengths), **key = PySequence_Fast_ITEMS(keys);
    Py_ssize_t start = 0, size, previous;
    total_t total;
    group_key = Py_NewRef(key[0]);
    size = previous = PyLong_AsSsize_t(len[0]);
    total = size;
    if (size == -1 && PyErr_Occurred())
        goto done;
    for (Py_ssize_t i = 1; i < count; i++) {
        Py_ssize_t length = PyLong_AsSsize_t(len[i]);
        if (length == -1 && PyErr_Occurred())
            goto done;
        int same = 0;
        if (previous == size && length <= size && total + length <= max_bytes
            && i - start < max_segments) {
            if (key[i] == group_key) {
                same = 1;
            } else {
                PyObject *k = Py_NewRef(key[i]);
                same = PyObject_RichCompareBool(k, group_key, Py_EQ);
                Py_DECREF(k);
                if (same < 0)
                    goto done;
                /* __eq__ ran Python: the lists (when they are lists) may have changed */
                if (PySequence_Fast_GET_SIZE(lengths) < count
                    || PySequence_Fast_GET_SIZE(keys) < count) {
                    PyErr_SetString(PyExc_IndexError, "the lists shrank during plan_groups");
                    goto done;
                }
                len = PySequence_Fast_ITEMS(lengths);
                key = PySequence_Fast_ITEMS(keys);
            }
        }
        if (same) {
            total += length;
            previous = length;
            continue;
        }
        PyObject *g = Py_BuildValue("(nn)", start, i);
        if (g == NULL || PyList_Append(groups, g) < 0) {
            Py_XDECREF(g);
            goto done;
        }
        Py_DECREF(g);
        start = i;
        Py_SETREF(group_key, Py_NewRef(key[i]));
        size = previous = length;
        total = length;
    }
    PyObject *g = Py_BuildValue("(nn)", start, count);
    if (g == NULL || PyList_Append(groups, g) < 0) {
        Py_XDECREF(g);
        goto done;
    }
    Py_DECREF(g);
    result = Py_NewRef(groups);
done:
    Py_XDECREF(group_key);
    Py_XDECREF(groups);
    Py_XDECREF(keys);
    Py_XDECREF(lengths);
    return result;
}

/* -- TX: read_tun: the TUN drain of overlay.backends.udp.UdpDataplane._read_tun ------------ */

static PyObject *str_addr, *str_prefix;

#define VNET_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1

static int tx_drop(PyObject *drop, const char *reason, Py_ssize_t at, Py_ssize_t length)
{
    PyObject *r = PyObject_CallFunction(drop, "snn", reason, at, length);
    Py_XDECREF(r);
    return r != NULL;
}

static PyObject *read_tun(PyObject *self, PyObject *args)
{
    int fd, vnet, tso;
    Py_buffer arena;
    Py_ssize_t headroom, budget, limit;
    PyObject *lookup, *tx_peers, *no_route, *drop;
    if (!PyArg_ParseTuple(args, "iw*pnnnpOO!OO", &fd, &arena, &vnet, &headroom, &budget, &limit,
                          &tso, &lookup, &PyDict_Type, &tx_peers, &no_route, &drop))
        return NULL;
    uint8_t *b = arena.buf;
    Py_ssize_t size = arena.len;
    PyObject *lengths = PyList_New(0), *addrs = PyList_New(0), *result = NULL;
    PyObject *addr = NULL, *prefix = NULL; /* the current peer's, owned */
    /* at most a partial checksum per packet kept, and each kept packet takes >= 20 bytes
     * of the arena: no more than size / 20 + 1 of them, whatever the budget (which made
     * the size_t product wrap) */
    Py_ssize_t most = budget < size / 20 + 1 ? budget : size / 20 + 1;
    Py_ssize_t (*regions)[3] = PyMem_Malloc(sizeof *regions * (size_t)(most > 0 ? most : 1));
    Py_ssize_t nregions = 0, supers = 0, at = 0;
    uint8_t last_dst[4] = {0};
    int have_dst = 0;
    char detail[96];
    if (lengths == NULL || addrs == NULL || regions == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (headroom < 0 || headroom > size || limit > size - 2 * 65535 - headroom - 3) {
        PyErr_SetString(PyExc_ValueError, "read_tun: the arena is too small for its limit");
        goto done;
    }
    for (Py_ssize_t n = 0; n < budget; n++) {
        if (at > limit)
            break;
        Py_ssize_t body = at + headroom;
        uint8_t hdr[10] = {0};
        struct iovec iov[2];
        int k = 0;
        if (vnet)
            iov[k++] = (struct iovec){hdr, 10};
        iov[k++] = (struct iovec){b + body, (size_t)(size - body)};
        ssize_t got;
        do
            got = readv(fd, iov, k);
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        Py_ssize_t length = got - (vnet ? 10 : 0);
        if (length < 20 || b[body] >> 4 != 4) {
            if (!tx_drop(drop, "tx_not_ipv4", body, length))
                goto done;
            continue;
        }
        if (!have_dst || memcmp(b + body + 16, last_dst, 4) != 0) {
            PyObject *dst = PyBytes_FromStringAndSize((const char *)b + body + 16, 4);
            PyObject *peer = dst ? PyObject_CallOneArg(lookup, dst) : NULL;
            Py_XDECREF(dst);
            if (peer == NULL)
                goto done;
            PyObject *new_prefix = peer == Py_None ? NULL : PyObject_GetAttr(peer, str_prefix);
            if (peer != Py_None && new_prefix == NULL) {
                Py_DECREF(peer);
                goto done;
            }
            if (new_prefix != NULL && !PyBytes_Check(new_prefix)) {
                PyErr_SetString(PyExc_TypeError, "read_tun: a peer's prefix must be bytes");
                Py_DECREF(new_prefix);
                Py_DECREF(peer);
                goto done;
            }
            if (new_prefix == NULL || PyBytes_GET_SIZE(new_prefix) != headroom) {
                Py_XDECREF(new_prefix);
                Py_DECREF(peer);
                have_dst = 0;
                PyObject *packet = PyBytes_FromStringAndSize((const char *)b + body, length);
                PyObject *r = packet ? PyObject_CallOneArg(no_route, packet) : NULL;
                Py_XDECREF(packet);
                if (r == NULL)
                    goto done;
                Py_DECREF(r);
                continue;
            }
            PyObject *new_addr = PyObject_GetAttr(peer, str_addr);
            if (new_addr == NULL || PyDict_SetItem(tx_peers, new_addr, peer) < 0) {
                Py_XDECREF(new_addr);
                Py_DECREF(new_prefix);
                Py_DECREF(peer);
                goto done;
            }
            Py_DECREF(peer);
            Py_XSETREF(addr, new_addr);
            Py_XSETREF(prefix, new_prefix);
            memcpy(last_dst, b + body + 16, 4);
            have_dst = 1;
        }
        if (tso && (hdr[1] || hdr[0] & VNET_NEEDS_CSUM)) {
            uint16_t gso_size, csum_start, csum_offset;
            memcpy(&gso_size, hdr + 4, 2);
            memcpy(&csum_start, hdr + 6, 2);
            memcpy(&csum_offset, hdr + 8, 2);
            if (hdr[1] == VNET_GSO_TCPV4) {
                Py_ssize_t out[3];
                const char *reason = cut_tcp4(b, size, at, length, gso_size,
                                              (const uint8_t *)PyBytes_AS_STRING(prefix),
                                              headroom, out, detail, sizeof detail);
                if (reason != NULL) {
                    char name[32];
                    snprintf(name, sizeof name, "tx_%s", reason);
                    if (!tx_drop(drop, name, body, length))
                        goto done;
                    continue;
                }
                for (Py_ssize_t i = 0; i < out[0]; i++) {
                    PyObject *len = PyLong_FromSsize_t(i < out[0] - 1 ? out[1] : out[2]);
                    if (len == NULL || PyList_Append(lengths, len) < 0
                        || PyList_Append(addrs, addr) < 0) {
                        Py_XDECREF(len);
                        goto done;
                    }
                    Py_DECREF(len);
                }
                at += (out[0] - 1) * out[1] + out[2];
                supers++;
                continue;
            }
            if (hdr[1] != VNET_GSO_NONE) {
                if (!tx_drop(drop, "tx_gso_unsupported", body, length))
                    goto done;
                continue;
            }
            /* encap.tso.partial_region */
            Py_ssize_t start = body + csum_start, field = start + csum_offset, end = body + length;
            if (!(body < start && start <= field && field <= end - 2)) {
                if (!tx_drop(drop, "tx_bad_csum_offsets", body, length))
                    goto done;
                continue;
            }
            regions[nregions][0] = start;
            regions[nregions][1] = end;
            regions[nregions][2] = field;
            nregions++;
        }
        if (headroom)
            memcpy(b + at, PyBytes_AS_STRING(prefix), (size_t)headroom);
        PyObject *len = PyLong_FromSsize_t(headroom + length);
        if (len == NULL || PyList_Append(lengths, len) < 0 || PyList_Append(addrs, addr) < 0) {
            Py_XDECREF(len);
            goto done;
        }
        Py_DECREF(len);
        at = body + length;
    }
    for (Py_ssize_t i = 0; i < nregions; i++) { /* encap.tso.finish_checksums */
        Py_ssize_t *r = regions[i];
        uint32_t c = ~fold(sum16(b + r[0], r[1] - r[0])) & 0xFFFF;
        if (c == 0 && r[2] - r[0] == 6)
            c = 0xFFFF;
        put16(b + r[2], c);
    }
    result = Py_BuildValue("OOn", lengths, addrs, supers);
done:
    Py_XDECREF(lengths);
    Py_XDECREF(addrs);
    Py_XDECREF(addr);
    Py_XDECREF(prefix);
    PyMem_Free(regions);
    PyBuffer_Release(&arena);
    return result;
}

/* -- TX: finish_checksums --------------------------------------------------------------- */

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

/* -- RX: the rules of encap.gso.drop_reason and vxlan_reason ----------------------------- */

enum {
    OK = 0,
    R_NOT_IPV4,
    R_BAD_LENGTH,
    R_BAD_IHL,
    R_BAD_IP_CSUM,
    R_BAD_OPTIONS,
    R_FOREIGN,
    R_NOT_OURS,
    R_BAD_L4_HDR,
    R_BAD_L4_CSUM,
    R_VX_TRUNC,
    R_VX_FLAGS,
    R_VX_VNI,
    R_VX_ETHER,
    R_VX_MAC,
    R_TUN_FULL,
    R_TUN_ERROR,
    R_COUNT,
    R_ARP = R_COUNT, /* not a drop: an ARP frame for the caller to answer */
};

static const char *const reason_names[R_COUNT] = {
    NULL,
    "rx_not_ipv4",
    "rx_bad_length",
    "rx_bad_ihl",
    "rx_bad_ip_checksum",
    "rx_bad_ip_options",
    "rx_foreign_source",
    "rx_not_our_subnet",
    "rx_bad_l4_header",
    "rx_bad_l4_checksum",
    "rx_vxlan_truncated",
    "rx_vxlan_bad_flags",
    "rx_vxlan_wrong_vni",
    "rx_vxlan_bad_ethertype",
    "rx_vxlan_foreign_mac",
    "rx_tun_full",
    "rx_tun_error",
};
static PyObject *reason_strings[R_COUNT];

typedef struct {
    uint32_t net;
    int shift; /* 0..32 */
} subnet_t;

static inline int inside(uint32_t address, subnet_t s)
{
    return (uint32_t)((uint64_t)address >> s.shift) == s.net;
}

/* (network >> shift, shift) as Python passes it: shift 0..32, the network within 32 bits. */
static int parse_subnet(PyObject *item, subnet_t *out)
{
    PyObject *network;
    int shift;
    if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "O!i", &PyLong_Type, &network, &shift)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "a subnet is a (network >> shift, shift) tuple");
        return 0;
    }
    /* not "K": it masks, so -(2**64) + 5 would be network 5 */
    unsigned long long net = PyLong_AsUnsignedLongLong(network);
    if (net == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return 0;
        PyErr_Clear();
    }
    if (shift < 0 || shift > 32 || net > 0xFFFFFFFFull) {
        PyErr_SetString(PyExc_ValueError, "a subnet needs 0 <= shift <= 32 and a 32-bit network");
        return 0;
    }
    out->net = (uint32_t)net;
    out->shift = shift;
    return 1;
}

typedef struct {
    subnet_t *sources;
    Py_ssize_t nsources;
    subnet_t destination;
    int vxlan;
    uint8_t vni[3];
    uint8_t mac[6];
} rules_t;

static int options_ok(const uint8_t *d, Py_ssize_t at, Py_ssize_t end)
{
    while (at < end) {
        uint8_t kind = d[at];
        if (kind == 0)
            return 1;
        if (kind == 1) {
            at++;
            continue;
        }
        if (at + 1 >= end || d[at + 1] < 2 || at + d[at + 1] > end)
            return 0;
        at += d[at + 1];
    }
    return 1;
}

/* encap.gso.l4_checksum_reason: d[start:end] holds a TCP or UDP packet, L4 header at l4. */
static int l4_check(uint8_t *d, Py_ssize_t start, Py_ssize_t l4, Py_ssize_t end)
{
    Py_ssize_t length = end - l4, field;
    if (d[start + 9] == 6) {
        if (length < 20 || d[l4 + 12] >> 4 < 5 || (d[l4 + 12] >> 4) * 4 > length)
            return R_BAD_L4_HDR;
        field = l4 + 16;
    } else {
        if (length < 8 || (Py_ssize_t)be16(d + l4 + 4) != length)
            return R_BAD_L4_HDR;
        field = l4 + 6;
        if (!d[field] && !d[field + 1])
            return OK; /* UDP without a checksum */
    }
    uint32_t pseudo = (sum16(d + start + 12, 8) + d[start + 9] + (uint32_t)(length % 0xFFFF)) % 0xFFFF;
    uint32_t body = sum16(d + l4, length);
    if ((pseudo + body) % 0xFFFF == 0)
        return OK;
    if ((be16(d + field) + 0xFFFF - pseudo) % 0xFFFF)
        return R_BAD_L4_CSUM;
    uint32_t c = ~fold(body) & 0xFFFF; /* the field's pseudo-header sum is in body */
    if (c == 0 && field == l4 + 6)
        c = 0xFFFF;
    put16(d + field, c);
    return OK;
}

/* encap.gso.drop_reason */
static int check_inner(uint8_t *d, Py_ssize_t start, Py_ssize_t end, const rules_t *rules)
{
    Py_ssize_t length = end - start;
    if (length < 20 || d[start] >> 4 != 4 || (d[start] & 0x0F) < 5)
        return R_NOT_IPV4;
    if ((Py_ssize_t)be16(d + start + 2) != length)
        return R_BAD_LENGTH;
    Py_ssize_t hl = (d[start] & 0x0F) * 4;
    if (hl > length)
        return R_BAD_IHL;
    if (sum16(d + start, hl) != 0)
        return R_BAD_IP_CSUM;
    if (hl > 20 && !options_ok(d, start + 20, start + hl))
        return R_BAD_OPTIONS;
    uint32_t source = be32(d + start + 12);
    Py_ssize_t i;
    for (i = 0; i < rules->nsources; i++)
        if (inside(source, rules->sources[i]))
            break;
    if (i == rules->nsources)
        return R_FOREIGN;
    if (!inside(be32(d + start + 16), rules->destination))
        return R_NOT_OURS;
    uint8_t protocol = d[start + 9];
    if ((protocol != 6 && protocol != 17) || (d[start + 6] & 0x3F) || d[start + 7])
        return OK;
    return l4_check(d, start, start + hl, end);
}

/* encap.gso.vxlan_reason */
static int check_vxlan(const uint8_t *d, Py_ssize_t at, Py_ssize_t end, const rules_t *rules)
{
    if (end - at < 22 + 20)
        return R_VX_TRUNC;
    if (!(d[at] & 0x08))
        return R_VX_FLAGS;
    if (memcmp(d + at + 4, rules->vni, 3) != 0)
        return R_VX_VNI;
    if (d[at + 20] != 0x08 || d[at + 21] != 0x00) {
        if (d[at + 20] == 0x08 && d[at + 21] == 0x06)
            return R_ARP;
        return R_VX_ETHER;
    }
    if (memcmp(d + at + 8, rules->mac, 6) != 0)
        return R_VX_MAC;
    return OK;
}

/* -- RX: the plan of encap.gso.plan_tun_writes / valid_pieces ------------------------------ */

#define MAX_RUN 64 /* encap.gso.MAX_SEGMENTS */
#define VXLAN_HEADROOM 22

typedef struct {
    Py_ssize_t head, head_end; /* a plain write: the packet; a run: its first segment */
    Py_ssize_t header_length;
    Py_ssize_t total;          /* a run: the super-packet's IPv4 total length */
    Py_ssize_t run_length;     /* a run: the length of every segment but the last */
    Py_ssize_t first, count;   /* a run: payloads pieces[first:first + count] */
    int psh;
    int oversize;              /* one packet beyond the MTU, written as a super-packet */
} plan_write_t;

typedef struct {
    Py_ssize_t start, end;
} piece_t;

typedef struct {
    plan_write_t *writes;
    Py_ssize_t nwrites;
    piece_t *pieces; /* run payloads */
    Py_ssize_t npieces;
    Py_ssize_t *arp;
    Py_ssize_t narp;
    Py_ssize_t drops[R_COUNT];
} plan_t;

static int plan_alloc(plan_t *plan, Py_ssize_t datagrams)
{
    memset(plan, 0, sizeof *plan);
    plan->writes = PyMem_RawMalloc(sizeof(plan_write_t) * (size_t)datagrams);
    plan->pieces = PyMem_RawMalloc(sizeof(piece_t) * (size_t)datagrams);
    plan->arp = PyMem_RawMalloc(sizeof(Py_ssize_t) * (size_t)datagrams);
    if (!plan->writes || !plan->pieces || !plan->arp) {
        PyErr_NoMemory();
        return 0;
    }
    return 1;
}

static void plan_free(plan_t *plan)
{
    PyMem_RawFree(plan->writes);
    PyMem_RawFree(plan->pieces);
    PyMem_RawFree(plan->arp);
}

/* The fields a segment must share with the open run (encap.gso._HEADERS). */
static int continues(const uint8_t *d, Py_ssize_t start, Py_ssize_t head, Py_ssize_t hl)
{
    return d[start] == 0x45 && d[start + 1] == d[head + 1]       /* ver_ihl, tos */
        && memcmp(d + start + 6, d + head + 6, 4) == 0             /* frag, ttl, protocol */
        && memcmp(d + start + 12, d + head + 12, 12) == 0          /* addresses, ports */
        && memcmp(d + start + 28, d + head + 28, 5) == 0           /* ack, data offset */
        && memcmp(d + start + 34, d + head + 34, 2) == 0           /* window */
        && memcmp(d + start + 40, d + head + 40, (size_t)(hl - 40)) == 0; /* options */
}

/* plan_tun_writes when coalesce, else valid_pieces (then every write is plain). No
 * Python calls (the GIL is kept all the same): touches only d[0:size] and the plan. */
static void make_plan(uint8_t *d, Py_ssize_t size, Py_ssize_t segment, const rules_t *rules,
                      int coalesce, Py_ssize_t mtu, plan_t *plan)
{
    Py_ssize_t skip = rules->vxlan ? VXLAN_HEADROOM : 0;
    int run = 0; /* a run is open: the write plan->writes[nwrites] being built */
    plan_write_t *w = NULL;
    uint32_t expect = 0;
#define EMIT(psh_)                                                                        \
    do {                                                                                  \
        if (w->count == 1) {                                                              \
            w->count = 0;                                                                 \
            plan->npieces--;                                                              \
        } else {                                                                          \
            w->psh = (psh_);                                                              \
        }                                                                                 \
        plan->nwrites++;                                                                  \
        run = 0;                                                                          \
    } while (0)
    for (Py_ssize_t base = 0; base < size; base += segment) {
        Py_ssize_t end = segment > size - base ? size : base + segment;
        if (rules->vxlan) {
            int r = check_vxlan(d, base, end, rules);
            if (r != OK) {
                if (run)
                    EMIT(0);
                if (r == R_ARP)
                    plan->arp[plan->narp++] = base;
                else
                    plan->drops[r]++;
                continue;
            }
        }
        Py_ssize_t start = base + skip, length = end - start;
        if (run && length > w->header_length) {
            uint8_t fl = d[start + 33];
            if (be32(d + start + 24) == expect && continues(d, start, w->head, w->header_length)
                && (Py_ssize_t)be16(d + start + 2) == length && length <= w->run_length
                && (fl == ACK || fl == (ACK | PSH)) && sum16(d + start, 20) == 0
                && l4_check(d, start, start + 20, end) == OK) {
                Py_ssize_t payload = length - w->header_length;
                plan->pieces[plan->npieces++] = (piece_t){start + w->header_length, end};
                w->count++;
                w->total += payload;
                expect = be32(d + start + 24) + (uint32_t)payload;
                int psh = fl != ACK;
                if (psh || length < w->run_length || w->count == MAX_RUN)
                    EMIT(psh);
                continue;
            }
        }
        if (run)
            EMIT(0);
        int r = check_inner(d, start, end, rules);
        if (r != OK) {
            plan->drops[r]++;
            continue;
        }
        w = &plan->writes[plan->nwrites];
        int simple_tcp = d[start] == 0x45 && d[start + 9] == 6 && (d[start + 6] & 0x3F) == 0
                      && d[start + 7] == 0; /* no IP options, not a fragment */
        if (coalesce && simple_tcp && length > mtu && mtu > 20 + (d[start + 32] >> 4) * 4) {
            /* one TCP packet beyond the TUN's MTU: a super-packet of mtu-sized segments */
            Py_ssize_t hl = 20 + (d[start + 32] >> 4) * 4;
            *w = (plan_write_t){.head = start, .head_end = end, .header_length = hl,
                                .total = length, .run_length = mtu, .first = plan->npieces,
                                .count = 1, .oversize = 1};
            plan->pieces[plan->npieces++] = (piece_t){start + hl, end};
            plan->nwrites++;
            continue;
        }
        if (coalesce && simple_tcp && length > 40 && d[start + 33] == ACK) {
            Py_ssize_t offset = d[start + 32] >> 4;
            if (offset >= 5 && length > 20 + offset * 4) {
                *w = (plan_write_t){.head = start, .head_end = end, .header_length = 20 + offset * 4,
                                    .total = length, .run_length = length,
                                    .first = plan->npieces, .count = 1};
                plan->pieces[plan->npieces++] = (piece_t){start + w->header_length, end};
                expect = be32(d + start + 24) + (uint32_t)(length - w->header_length);
                run = 1;
                continue;
            }
        }
        *w = (plan_write_t){.head = start, .head_end = end};
        plan->nwrites++;
    }
    if (run)
        EMIT(0);
#undef EMIT
}

/* encap.gso.tcp_super_header: the virtio_net_hdr (10 bytes) and IPv4+TCP header of a run. */
static void super_header(const uint8_t *d, const plan_write_t *w, uint8_t *vnet, uint8_t *header)
{
    Py_ssize_t hl = w->header_length;
    memcpy(header, d + w->head, (size_t)hl);
    put16(header + 2, (uint32_t)w->total);
    put16(header + 10, 0);
    put16(header + 10, ~fold(sum16(header, 20)) & 0xFFFF);
    if (w->psh)
        header[33] |= PSH;
    uint32_t pseudo = (sum16(header + 12, 8) + 6 + (uint32_t)(w->total - 20)) % 0xFFFF;
    put16(header + 36, fold(pseudo));
    /* struct virtio_net_hdr, native order: flags NEEDS_CSUM, gso_type TCPV4, hdr_len,
     * gso_size, csum_start 20, csum_offset 16 */
    uint16_t fields[4] = {(uint16_t)hl, (uint16_t)(w->run_length - hl), 20, 16};
    vnet[0] = 1;
    vnet[1] = 1;
    memcpy(vnet + 2, fields, sizeof fields);
}

/* Arguments shared by valid_pieces / plan_tun_writes / deliver. */
typedef struct {
    Py_buffer data;
    Py_ssize_t size, segment, mtu;
    PyObject *drops, *arp;
    rules_t rules;
    subnet_t source_storage[8];
} rx_args_t;

static int parse_rules(rx_args_t *a, PyObject *sources, PyObject *destination, PyObject *vxlan)
{
    memset(&a->rules, 0, sizeof a->rules);
    /* a tuple of our own (free when sources is one): parsing a subnet may run Python (an
     * __index__) that changes a list of them while we walk it */
    PyObject *seq = PySequence_Tuple(sources);
    if (seq == NULL)
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    a->rules.sources = n <= 8 ? a->source_storage : PyMem_Malloc(sizeof(subnet_t) * (size_t)n);
    if (a->rules.sources == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return 0;
    }
    a->rules.nsources = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!parse_subnet(PyTuple_GET_ITEM(seq, i), &a->rules.sources[i])) {
            Py_DECREF(seq);
            return 0;
        }
    }
    Py_DECREF(seq);
    if (!parse_subnet(destination, &a->rules.destination))
        return 0;
    if (vxlan != Py_None) {
        Py_buffer vni, mac;
        if (!PyArg_ParseTuple(vxlan, "y*y*", &vni, &mac))
            return 0;
        int ok = vni.len == 3 && mac.len == 6;
        if (ok) {
            memcpy(a->rules.vni, vni.buf, 3);
            memcpy(a->rules.mac, mac.buf, 6);
        }
        PyBuffer_Release(&vni);
        PyBuffer_Release(&mac);
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "vxlan is (3 VNI bytes, 6-byte VTEP MAC)");
            return 0;
        }
        a->rules.vxlan = 1;
    }
    return 1;
}

static void rx_args_release(rx_args_t *a)
{
    if (a->rules.sources != a->source_storage)
        PyMem_Free(a->rules.sources);
    PyBuffer_Release(&a->data);
}

/* Checks of the receive arguments; returns 1 to go on, 0 on error, -1 for an empty
 * datagram (counted as the reference does). */
static int rx_check(rx_args_t *a)
{
    if (a->size > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "a GRO receive is at most 65535 bytes, not %zd", a->size);
        return 0;
    }
    if (a->size > a->data.len) {
        PyErr_Format(PyExc_ValueError, "size %zd is beyond the buffer (%zd bytes)", a->size,
                     a->data.len);
        return 0;
    }
    if (a->size <= 0 || a->segment <= 0)
        return -1;
    return 1;
}

static int count_drops(PyObject *drops, const Py_ssize_t *counts)
{
    for (int r = 1; r < R_COUNT; r++) {
        if (!counts[r])
            continue;
        PyObject *old = PyObject_GetItem(drops, reason_strings[r]);
        Py_ssize_t value = 0;
        if (old == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError))
                return 0;
            PyErr_Clear();
        } else {
            value = PyLong_AsSsize_t(old);
            Py_DECREF(old);
            if (value == -1 && PyErr_Occurred())
                return 0;
        }
        PyObject *new = PyLong_FromSsize_t(value + counts[r]);
        if (new == NULL || PyObject_SetItem(drops, reason_strings[r], new) < 0) {
            Py_XDECREF(new);
            return 0;
        }
        Py_DECREF(new);
    }
    return 1;
}

static int count_empty(PyObject *drops)
{
    Py_ssize_t counts[R_COUNT] = {0};
    counts[R_NOT_IPV4] = 1;
    return count_drops(drops, counts);
}

static int report(const plan_t *plan, PyObject *drops, PyObject *arp)
{
    if (!count_drops(drops, plan->drops))
        return 0;
    for (Py_ssize_t i = 0; arp != Py_None && i < plan->narp; i++) {
        PyObject *at = PyLong_FromSsize_t(plan->arp[i]);
        if (at == NULL || PyList_Append(arp, at) < 0) {
            Py_XDECREF(at);
            return 0;
        }
        Py_DECREF(at);
    }
    return 1;
}

static int parse_rx(PyObject *args, PyObject *kwargs, rx_args_t *a, int with_fd, int *fd,
                    int *coalesce, int *vnet)
{
    static char *plain_kw[] = {"data", "size", "segment", "sources", "destination", "drops",
                               "vxlan", "arp", "mtu", NULL};
    static char *fd_kw[] = {"fd", "data", "size", "segment", "sources", "destination", "drops",
                            "vxlan", "arp", "mtu", "coalesce", "vnet", NULL};
    PyObject *sources, *destination, *vxlan = Py_None;
    memset(a, 0, sizeof *a);
    a->arp = Py_None;
    int ok = with_fd
        ? PyArg_ParseTupleAndKeywords(args, kwargs, "iw*nnOOO|OOnpp", fd_kw, fd, &a->data,
                                      &a->size, &a->segment, &sources, &destination, &a->drops,
                                      &vxlan, &a->arp, &a->mtu, coalesce, vnet)
        : PyArg_ParseTupleAndKeywords(args, kwargs, "w*nnOOO|OOn", plain_kw, &a->data, &a->size,
                                      &a->segment, &sources, &destination, &a->drops, &vxlan,
                                      &a->arp, &a->mtu);
    if (!ok)
        return 0;
    if (a->arp != Py_None && !PyList_Check(a->arp)) {
        PyErr_SetString(PyExc_TypeError, "arp must be a list or None");
        PyBuffer_Release(&a->data);
        return 0;
    }
    if (!parse_rules(a, sources, destination, vxlan)) {
        rx_args_release(a);
        return 0;
    }
    return 1;
}

static PyObject *planned(PyObject *args, PyObject *kwargs, int coalesce)
{
    rx_args_t a;
    if (!parse_rx(args, kwargs, &a, 0, NULL, NULL, NULL))
        return NULL;
    PyObject *result = NULL;
    plan_t plan = {0};
    int go = rx_check(&a);
    if (go <= 0) {
        if (go < 0 && count_empty(a.drops))
            result = PyList_New(0);
        goto done;
    }
    if (!plan_alloc(&plan, a.size / a.segment + (a.size % a.segment != 0)))
        goto done;
    uint8_t *d = a.data.buf;
    make_plan(d, a.size, a.segment, &a.rules, coalesce, a.mtu, &plan);
    if (!report(&plan, a.drops, a.arp))
        goto done;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < plan.nwrites; i++) {
        const plan_write_t *w = &plan.writes[i];
        PyObject *item;
        if (!coalesce) {
            item = Py_BuildValue("nn", w->head, w->head_end);
        } else if (w->count == 0) {
            item = Py_BuildValue("[y#y#]nn", "\0\0\0\0\0\0\0\0\0\0", (Py_ssize_t)10,
                                 (const char *)d + w->head, w->head_end - w->head, (Py_ssize_t)1,
                                 w->head_end - w->head);
        } else {
            uint8_t vnet[10], header[120];
            super_header(d, w, vnet, header);
            PyObject *buffers = Py_BuildValue("[y#y#]", (const char *)vnet, (Py_ssize_t)10,
                                              (const char *)header, w->header_length);
            for (Py_ssize_t k = 0; buffers != NULL && k < w->count; k++) {
                const piece_t *p = &plan.pieces[w->first + k];
                PyObject *b = PyBytes_FromStringAndSize((const char *)d + p->start,
                                                        p->end - p->start);
                if (b == NULL || PyList_Append(buffers, b) < 0)
                    Py_CLEAR(buffers);
                Py_XDECREF(b);
            }
            item = buffers == NULL ? NULL
                 : Py_BuildValue("Nnn", buffers, w->count,
                                 w->total + (w->count - 1) * w->header_length);
        }
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            goto done;
        }
        Py_DECREF(item);
    }
    result = list;
done:
    plan_free(&plan);
    rx_args_release(&a);
    return result;
}

static PyObject *valid_pieces(PyObject *self, PyObject *args, PyObject *kwargs)
{
    return planned(args, kwargs, 0);
}

static PyObject *plan_tun_writes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    return planned(args, kwargs, 1);
}

static PyObject *drop_reason(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t start, end;
    PyObject *sources, *destination;
    if (!PyArg_ParseTuple(args, "w*nnOO", &data, &start, &end, &sources, &destination))
        return NULL;
    rx_args_t a;
    memset(&a, 0, sizeof a);
    a.data = data;
    PyObject *result = NULL;
    if (!parse_rules(&a, sources, destination, Py_None))
        goto done;
    if (!(0 <= start && start <= end && end <= data.len)) {
        PyErr_Format(PyExc_ValueError, "range %zd:%zd outside the buffer", start, end);
        goto done;
    }
    int r = check_inner(data.buf, start, end, &a.rules);
    result = Py_NewRef(r == OK ? Py_None : reason_strings[r]);
done:
    rx_args_release(&a);
    return result;
}

/* The TUN writes of a plan, then the counts: (packets, bytes, super-packets) written. */
static PyObject *deliver(PyObject *self, PyObject *args, PyObject *kwargs)
{
    rx_args_t a;
    int fd = -1, coalesce = 1, vnet = 1;
    if (!parse_rx(args, kwargs, &a, 1, &fd, &coalesce, &vnet))
        return NULL;
    PyObject *result = NULL;
    plan_t plan = {0};
    Py_ssize_t packets = 0, bytes = 0, supers = 0;
    int go = rx_check(&a);
    if (go <= 0) {
        if (go < 0 && count_empty(a.drops))
            result = Py_BuildValue("nnn", packets, bytes, supers);
        goto done;
    }
    if (!coalesce || !vnet)
        coalesce = 0; /* super-packets need the virtio_net_hdr */
    if (!plan_alloc(&plan, a.size / a.segment + (a.size % a.segment != 0)))
        goto done;
    uint8_t *d = a.data.buf;
    static const uint8_t plain[10] = {0};
    /* the GIL is kept: see the module docstring */
    make_plan(d, a.size, a.segment, &a.rules, coalesce, a.mtu, &plan);
    for (Py_ssize_t i = 0; i < plan.nwrites; i++) {
        const plan_write_t *w = &plan.writes[i];
        struct iovec iov[2 + MAX_RUN];
        uint8_t vhdr[10], header[120];
        int n = 0;
        Py_ssize_t carried = 1, length = w->head_end - w->head;
        if (w->count == 0) {
            if (vnet)
                iov[n++] = (struct iovec){(void *)plain, 10};
            iov[n++] = (struct iovec){d + w->head, (size_t)length};
        } else {
            super_header(d, w, vhdr, header);
            iov[n++] = (struct iovec){vhdr, 10};
            iov[n++] = (struct iovec){header, (size_t)w->header_length};
            for (Py_ssize_t k = 0; k < w->count; k++) {
                const piece_t *p = &plan.pieces[w->first + k];
                iov[n++] = (struct iovec){d + p->start, (size_t)(p->end - p->start)};
            }
            carried = w->count;
            length = w->total + (w->count - 1) * w->header_length;
        }
        int super = w->count > 1;
        if (writev(fd, iov, n) < 0) {
            plan.drops[errno == EAGAIN || errno == EWOULDBLOCK ? R_TUN_FULL : R_TUN_ERROR] += carried;
            continue;
        }
        packets += carried;
        bytes += length;
        supers += super;
    }
    if (report(&plan, a.drops, a.arp))
        result = Py_BuildValue("nnn", packets, bytes, supers);
done:
    plan_free(&plan);
    rx_args_release(&a);
    return result;
}

/* -- the module ------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"segment_tcp4", segment_tcp4, METH_VARARGS,
     "segment_tcp4(buf, at, length, gso_size, prefix) -> (count, stride, last): encap.tso's."},
    {"plan_groups", plan_groups, METH_VARARGS,
     "plan_groups(lengths, keys, max_segments=64, max_bytes=65000): encap.gso's."},
    {"read_tun", read_tun, METH_VARARGS,
     "read_tun(fd, arena, vnet, headroom, budget, limit, tso, lookup, tx_peers, no_route, drop) "
     "-> (lengths, addrs, super_packets): the TUN drain of UdpDataplane._read_tun."},
    {"finish_checksums", finish_checksums, METH_VARARGS,
     "finish_checksums(buf, regions): encap.tso's."},
    {"drop_reason", drop_reason, METH_VARARGS,
     "drop_reason(data, start, end, sources, destination) -> str | None: encap.gso's."},
    {"valid_pieces", (PyCFunction)(void (*)(void))valid_pieces, METH_VARARGS | METH_KEYWORDS,
     "valid_pieces(data, size, segment, sources, destination, drops, vxlan=None, arp=None): "
     "encap.gso's (mtu is ignored)."},
    {"plan_tun_writes", (PyCFunction)(void (*)(void))plan_tun_writes,
     METH_VARARGS | METH_KEYWORDS,
     "plan_tun_writes(data, size, segment, sources, destination, drops, vxlan=None, arp=None, "
     "mtu=0): "
     "encap.gso's, with copies (bytes) where the reference has memoryviews."},
    {"deliver", (PyCFunction)(void (*)(void))deliver, METH_VARARGS | METH_KEYWORDS,
     "deliver(fd, data, size, segment, sources, destination, drops, vxlan=None, arp=None, "
     "mtu=0, coalesce=True, vnet=True) -> (packets, bytes, super_packets): the receive's TUN writes "
     "as plan_tun_writes (or valid_pieces without coalesce) plans them, each with a "
     "virtio_net_hdr if vnet; failed writes counted as rx_tun_full / rx_tun_error."},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    str_addr = PyUnicode_InternFromString("addr");
    str_prefix = PyUnicode_InternFromString("prefix");
    if (str_addr == NULL || str_prefix == NULL)
        return -1;
    PyObject *errors = PyImport_ImportModule("encap.errors");
    if (errors == NULL)
        return -1;
    codec_error = PyObject_GetAttrString(errors, "CodecError");
    Py_DECREF(errors);
    if (codec_error == NULL)
        return -1;
    for (int r = 1; r < R_COUNT; r++) {
        reason_strings[r] = PyUnicode_InternFromString(reason_names[r]);
        if (reason_strings[r] == NULL)
            return -1;
    }
    PyObject *reasons = PyTuple_New(R_COUNT - 1);
    if (reasons == NULL)
        return -1;
    for (int r = 1; r < R_COUNT; r++)
        PyTuple_SET_ITEM(reasons, r - 1, Py_NewRef(reason_strings[r]));
    if (PyModule_AddObject(module, "RX_REASONS", reasons) < 0) {
        Py_DECREF(reasons);
        return -1;
    }
    return PyModule_AddIntConstant(module, "MAX_RUN", MAX_RUN);
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "encap._native",
    .m_doc = "The dataplane's per-byte and per-packet work in C (see encap/native.py).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModuleDef_Init(&module_def);
}
