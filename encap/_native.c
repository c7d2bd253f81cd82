/* encap._native: the dataplane's per-byte and per-packet work in C.
 *
 * Each function here implements exactly the rules of a pure-Python function in encap/
 * (the reference and test oracle; tests/test_native.py proves them equal byte for byte):
 *
 *   segment_tcp4, finish_checksums      encap.tso   (TX: TSO segmentation, checksums)
 *   drop_reason, valid_pieces,          encap.gso   (RX: validation, TUN write plan)
 *   plan_tun_writes
 *   Drains (tx, rx, flush)              overlay.backends.udp.UdpDataplane's reader
 *                                       callbacks, each in one call (the drains, below)
 *
 * Every offset and length is checked against the buffer before it is used; nothing here
 * reads or writes outside the buffers it is given, whatever the input. The GIL is kept
 * throughout (README.md, "The native codecs"): the calls last microseconds in a dataplane
 * with one loop thread per process.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
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
    /* a receive's own drops (rx_drain), before any datagram of it is looked at */
    R_SOCKET_ERROR,
    R_TRUNCATED,
    R_UNKNOWN_PEER,
    R_ALL,
};

static const char *const reason_names[R_ALL] = {
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
    NULL, /* R_ARP */
    "rx_socket_error",
    "rx_truncated",
    "rx_unknown_peer",
};
static PyObject *reason_strings[R_ALL];

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
    /* room for a receive of up to MAX_RUN datagrams (every GRO receive, every gathered
     * run) without an allocation */
    plan_write_t local_writes[MAX_RUN];
    piece_t local_pieces[MAX_RUN];
    Py_ssize_t local_arp[MAX_RUN];
} plan_t;

static int plan_alloc(plan_t *plan, Py_ssize_t datagrams)
{
    memset(plan->drops, 0, sizeof plan->drops);
    plan->nwrites = plan->npieces = plan->narp = 0;
    if (datagrams <= MAX_RUN) {
        plan->writes = plan->local_writes;
        plan->pieces = plan->local_pieces;
        plan->arp = plan->local_arp;
        return 1;
    }
    plan->writes = PyMem_RawMalloc(sizeof(plan_write_t) * (size_t)datagrams);
    plan->pieces = PyMem_RawMalloc(sizeof(piece_t) * (size_t)datagrams);
    plan->arp = PyMem_RawMalloc(sizeof(Py_ssize_t) * (size_t)datagrams);
    if (!plan->writes || !plan->pieces || !plan->arp) {
        PyErr_NoMemory();
        return 0;
    }
    return 1;
}

/* Also for a plan whose plan_alloc failed or never ran (writes NULL). */
static void plan_free(plan_t *plan)
{
    if (plan->writes == plan->local_writes)
        return;
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

/* Arguments shared by valid_pieces / plan_tun_writes / drop_reason. */
typedef struct {
    Py_buffer data;
    Py_ssize_t size, segment, mtu;
    PyObject *drops, *arp;
    rules_t rules;
    subnet_t source_storage[8];
} rx_args_t;

/* rules->sources from a sequence of subnets, into storage (8 of them) or the heap
 * (sources_free releases it). */
static int parse_sources(rules_t *rules, subnet_t *storage, PyObject *sources)
{
    /* a tuple of our own (free when sources is one): parsing a subnet may run Python (an
     * __index__) that changes a list of them while we walk it */
    PyObject *seq = PySequence_Tuple(sources);
    if (seq == NULL)
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    rules->sources = n <= 8 ? storage : PyMem_Malloc(sizeof(subnet_t) * (size_t)n);
    rules->nsources = 0;
    if (rules->sources == NULL) {
        rules->sources = storage;
        Py_DECREF(seq);
        PyErr_NoMemory();
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!parse_subnet(PyTuple_GET_ITEM(seq, i), &rules->sources[i])) {
            Py_DECREF(seq);
            return 0;
        }
    }
    rules->nsources = n;
    Py_DECREF(seq);
    return 1;
}

static void sources_free(rules_t *rules, subnet_t *storage)
{
    if (rules->sources != storage)
        PyMem_Free(rules->sources);
    rules->sources = storage;
    rules->nsources = 0;
}

/* The rest of the rules: our subnet, and (vxlan) our VNI and VTEP MAC. */
static int parse_target(rules_t *rules, PyObject *destination, PyObject *vxlan)
{
    if (!parse_subnet(destination, &rules->destination))
        return 0;
    rules->vxlan = 0;
    if (vxlan != Py_None) {
        Py_buffer vni, mac;
        if (!PyArg_ParseTuple(vxlan, "y*y*", &vni, &mac))
            return 0;
        int ok = vni.len == 3 && mac.len == 6;
        if (ok) {
            memcpy(rules->vni, vni.buf, 3);
            memcpy(rules->mac, mac.buf, 6);
        }
        PyBuffer_Release(&vni);
        PyBuffer_Release(&mac);
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "vxlan is (3 VNI bytes, 6-byte VTEP MAC)");
            return 0;
        }
        rules->vxlan = 1;
    }
    return 1;
}

static int parse_rules(rx_args_t *a, PyObject *sources, PyObject *destination, PyObject *vxlan)
{
    memset(&a->rules, 0, sizeof a->rules);
    a->rules.sources = a->source_storage;
    return parse_sources(&a->rules, a->source_storage, sources)
        && parse_target(&a->rules, destination, vxlan);
}

static void rx_args_release(rx_args_t *a)
{
    sources_free(&a->rules, a->source_storage);
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

/* drops[names[r]] += counts[r] for every r with a count, through the mapping protocol
 * (so a Counter's or overlay.drop_log.Drops's __missing__ runs as for `drops[r] += 1`). */
static int add_counts(PyObject *drops, PyObject *const *names, const Py_ssize_t *counts, int n)
{
    for (int r = 0; r < n; r++) {
        if (!counts[r] || names[r] == NULL)
            continue;
        PyObject *old = PyObject_GetItem(drops, names[r]);
        if (old == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError))
                return 0;
            PyErr_Clear();
            old = PyLong_FromLong(0);
            if (old == NULL)
                return 0;
        }
        PyObject *delta = PyLong_FromSsize_t(counts[r]);
        PyObject *new = delta ? PyNumber_Add(old, delta) : NULL;
        Py_DECREF(old);
        Py_XDECREF(delta);
        if (new == NULL || PyObject_SetItem(drops, names[r], new) < 0) {
            Py_XDECREF(new);
            return 0;
        }
        Py_DECREF(new);
    }
    return 1;
}

static int count_drops(PyObject *drops, const Py_ssize_t *counts)
{
    return add_counts(drops, reason_strings, counts, R_COUNT);
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

static int parse_rx(PyObject *args, PyObject *kwargs, rx_args_t *a)
{
    static char *keywords[] = {"data", "size", "segment", "sources", "destination", "drops",
                               "vxlan", "arp", "mtu", NULL};
    PyObject *sources, *destination, *vxlan = Py_None;
    memset(a, 0, sizeof *a);
    a->arp = Py_None;
    int ok = PyArg_ParseTupleAndKeywords(args, kwargs, "w*nnOOO|OOn", keywords, &a->data,
                                         &a->size, &a->segment, &sources, &destination,
                                         &a->drops, &vxlan, &a->arp, &a->mtu);
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
    if (!parse_rx(args, kwargs, &a))
        return NULL;
    PyObject *result = NULL;
    plan_t plan;
    plan.writes = NULL;
    plan.pieces = NULL;
    plan.arp = NULL;
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

/* -- the drains: one call per wake-up ---------------------------------------------------
 *
 * Drains(dataplane, budget).tx and .rx are the reader callbacks of
 * overlay.backends.udp.UdpDataplane (on_tun_readable, on_socket_readable_gro /
 * on_socket_readable) with everything they call, in C: the Python methods are the
 * reference, run when a trace is attached or the module is missing, and the tests prove
 * the two equal (tests/test_fastpath.py, tests/test_native.py).
 *
 * At a low packet rate every Python object a wake-up touches is a cache miss, so a
 * Drains reads the dataplane's fixed attributes once, when it is made (the fds, vnet
 * header, headroom, tso, gro, tun_gso, mtu, our subnet, the vxlan rules, the peer table
 * and counters objects, the two buffers, exported for its lifetime so they cannot
 * move). Per wake-up it reads only what Python may change at run time: dataplane.tap
 * (a trace attached: the wake-up goes to the Python method), dataplane.gso (turned off
 * after an EIO), and peers.routes / peers.senders, whose identity says whether the last
 * route and sender lookups it kept still hold (control.peer_table.PeerTable swaps whole
 * tables on every change, so a new lease is used at the next wake-up). Its counts stay
 * in C and are added to the dataplane's counters and the peers' stats by flush(): at
 * the end of a wake-up when the last flush is a second old, before every
 * Counters.snapshot() (the dataplane installs flush as Counters.pending), and at
 * stop(); drops are added at once (the drop log watches for new reasons). Python runs
 * only for the rare events that need it: a packet without a route (_no_route), an ARP
 * request (vxlan's _answer_arp), a drop reason counted for the first time
 * (Drops.__missing__).
 */

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#define VNET_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define BATCH_MAX 64        /* overlay.counters.BATCH_MAX */
#define MAX_GSO_BYTES 65000 /* encap.gso.MAX_GSO_BYTES */
#define MAX_DATAGRAM 65535  /* overlay.backends.udp.MAX_DATAGRAM */

enum {
    A_TUN, A_FD, A_VNET_HDR, A_SOCK, A_HEADROOM, A_TX_ARENA, A_RX_BUFFER, A_TSO,
    A_GSO, A_GSO_SENT, A_GRO, A_TUN_GSO, A_MTU, A_VXLAN_RULES, A_OWN, A_PEERS, A_ROUTES,
    A_SENDERS, A_ADDR, A_PREFIX, A_NO_ROUTE, A_ANSWER_ARP, A_COUNTERS, A_DROPS, A_TX_BATCH,
    A_RX_BATCH, A_TX_PACKETS, A_TX_BYTES, A_TX_GSO_SENDS, A_TX_TUN_SUPER, A_RX_PACKETS,
    A_RX_BYTES, A_RX_TUN_SUPER, A_RX_GRO_RECEIVES, A_LAST_TX, A_LAST_RX, A_TAP,
    A_ON_TUN_READABLE, A_ON_SOCKET_READABLE, A_ON_SOCKET_READABLE_GRO, A_COUNT
};
static const char *const attr_names[A_COUNT] = {
    "tun", "fd", "vnet_hdr", "sock", "headroom", "_tx_arena", "_rx_buffer", "tso",
    "gso", "_gso_sent", "gro", "tun_gso", "mtu", "vxlan_rules", "_own", "peers", "routes",
    "senders", "addr", "prefix", "_no_route", "_answer_arp", "counters", "drops", "tx_batch",
    "rx_batch", "tx_packets", "tx_bytes", "tx_gso_sends", "tx_tun_super_packets", "rx_packets",
    "rx_bytes", "rx_tun_super_packets", "rx_gro_receives", "last_tx", "last_rx", "tap",
    "on_tun_readable", "on_socket_readable", "on_socket_readable_gro",
};
static PyObject *attr[A_COUNT];

/* TX drop reasons ("tx_" + the CodecError reasons of encap.tso, and the send errors). */
enum {
    T_NONE, T_NOT_IPV4, T_GSO_BAD_LENGTH, T_GSO_NOT_TCP4, T_GSO_BAD_HEADERS, T_GSO_FRAGMENT,
    T_GSO_BAD_SIZE, T_GSO_NO_ROOM, T_GSO_UNSUPPORTED, T_BAD_CSUM_OFFSETS, T_SOCKET_FULL,
    T_SEND_ERROR, T_COUNT
};
static const char *const tx_reason_names[T_COUNT] = {
    NULL, "tx_not_ipv4", "tx_gso_bad_length", "tx_gso_not_tcp4", "tx_gso_bad_headers",
    "tx_gso_fragment", "tx_gso_bad_size", "tx_gso_no_room", "tx_gso_unsupported",
    "tx_bad_csum_offsets", "tx_socket_full", "tx_send_error",
};
static PyObject *tx_reason_strings[T_COUNT];

/* A cut_tcp4 reason as a T_* index. */
static int tx_reason(const char *codec_reason)
{
    for (int r = T_GSO_BAD_LENGTH; r <= T_GSO_NO_ROOM; r++)
        if (strcmp(tx_reason_names[r] + 3, codec_reason) == 0)
            return r;
    return T_GSO_BAD_LENGTH; /* not reached: cut_tcp4 has no other reasons */
}

/* Python's BlockingIOError */
static inline int would_block(int e)
{
    return e == EAGAIN || e == EWOULDBLOCK || e == EALREADY || e == EINPROGRESS;
}

static double monotonic(void) /* time.monotonic() */
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static inline PyObject *get(PyObject *o, int name) /* o.name, new reference */
{
    return PyObject_GetAttr(o, attr[name]);
}

static inline int set(PyObject *o, int name, PyObject *v) /* o.name = v */
{
    return PyObject_SetAttr(o, attr[name], v) == 0;
}

static int get_ssize(PyObject *o, int name, Py_ssize_t *out)
{
    PyObject *v = get(o, name);
    if (v == NULL)
        return 0;
    *out = PyNumber_AsSsize_t(v, PyExc_OverflowError);
    Py_DECREF(v);
    return !(*out == -1 && PyErr_Occurred());
}

static int get_bool(PyObject *o, int name, int *out)
{
    PyObject *v = get(o, name);
    if (v == NULL)
        return 0;
    *out = PyObject_IsTrue(v);
    Py_DECREF(v);
    return *out >= 0;
}

static int get_fd(PyObject *o, int name, int *out)
{
    PyObject *v = get(o, name);
    if (v == NULL)
        return 0;
    *out = PyObject_AsFileDescriptor(v); /* an int, or an object with fileno() */
    Py_DECREF(v);
    return *out >= 0;
}

/* o.name += delta (skipped for 0, which changes nothing) */
static int add_attr(PyObject *o, int name, Py_ssize_t delta)
{
    if (!delta)
        return 1;
    PyObject *old = get(o, name);
    if (old == NULL)
        return 0;
    PyObject *d = PyLong_FromSsize_t(delta);
    PyObject *new = d ? PyNumber_InPlaceAdd(old, d) : NULL;
    Py_DECREF(old);
    Py_XDECREF(d);
    if (new == NULL)
        return 0;
    int ok = set(o, name, new);
    Py_DECREF(new);
    return ok;
}

static int set_float(PyObject *o, int name, double value)
{
    PyObject *v = PyFloat_FromDouble(value);
    int ok = v != NULL && set(o, name, v);
    Py_XDECREF(v);
    return ok;
}

/* histogram[n] += counts[n] for each n (counters.tx_batch / rx_batch) */
static int add_histogram(PyObject *counters, int name, Py_ssize_t *counts)
{
    PyObject *histogram = NULL;
    for (Py_ssize_t n = 0; n <= BATCH_MAX; n++) {
        if (!counts[n])
            continue;
        if (histogram == NULL && (histogram = get(counters, name)) == NULL)
            return 0;
        PyObject *old = PySequence_GetItem(histogram, n);
        PyObject *d = old ? PyLong_FromSsize_t(counts[n]) : NULL;
        PyObject *new = d ? PyNumber_Add(old, d) : NULL;
        Py_XDECREF(old);
        Py_XDECREF(d);
        if (new == NULL || PySequence_SetItem(histogram, n, new) < 0) {
            Py_XDECREF(new);
            Py_DECREF(histogram);
            return 0;
        }
        Py_DECREF(new);
        counts[n] = 0; /* added: a flush retried after a later failure adds it once */
    }
    Py_XDECREF(histogram);
    return 1;
}

/* A (str, int) address as a sockaddr_in (PeerTable builds them from IPv4Address). */
static int parse_addr(PyObject *addr, struct sockaddr_in *sa)
{
    const char *ip;
    int port;
    if (!PyTuple_Check(addr) || !PyArg_ParseTuple(addr, "si", &ip, &port)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "a peer's addr is an (IPv4 address, port) tuple");
        return 0;
    }
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    if (port < 0 || port > 0xFFFF || inet_pton(AF_INET, ip, &sa->sin_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "not an IPv4 address and port: %R", addr);
        return 0;
    }
    sa->sin_port = htons((uint16_t)port);
    return 1;
}

/* peers.senders[ip]: (sources, stats) of the node sending from ip, a new reference; NULL
 * with no error set when it is not a peer. */
static PyObject *sender(PyObject *senders, const struct in_addr *ip)
{
    PyObject *key = PyLong_FromUnsignedLong(ntohl(ip->s_addr));
    if (key == NULL)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(senders, key);
    Py_XINCREF(entry);
    Py_DECREF(key);
    if (entry != NULL && (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2)) {
        PyErr_SetString(PyExc_TypeError, "peers.senders maps an IP to (sources, stats)");
        Py_CLEAR(entry);
    }
    return entry;
}

/* -- the Drains object: the dataplane's fixed attributes, read once --------------------- */

#define PENDING_PEERS 32
#define FLUSH_EVERY 1.0 /* seconds: pending counts are added at least this often */

enum {
    C_TX_PACKETS, C_TX_BYTES, C_TX_GSO_SENDS, C_TX_TUN_SUPER, C_RX_PACKETS, C_RX_BYTES,
    C_RX_TUN_SUPER, C_RX_GRO_RECEIVES, C_COUNT
};
static const int counter_attrs[C_COUNT] = {
    A_TX_PACKETS, A_TX_BYTES, A_TX_GSO_SENDS, A_TX_TUN_SUPER, A_RX_PACKETS, A_RX_BYTES,
    A_RX_TUN_SUPER, A_RX_GRO_RECEIVES,
};

typedef struct {
    PyObject *stats; /* a PeerStats, owned */
    Py_ssize_t tx_packets, tx_bytes, rx_packets, rx_bytes;
    double last_tx, last_rx;
} pending_peer_t;

typedef struct {
    PyObject_HEAD
    PyObject *dp, *counters, *peers; /* owned */
    PyObject *arena_obj, *rx_obj;    /* owned, their buffers exported for our lifetime */
    Py_buffer arena, rx;
    int tun_fd, sock_fd, vnet, tso, gro, coalesce, gso_sent;
    Py_ssize_t headroom, mtu, budget;
    rules_t rules; /* destination and vxlan from the dataplane, sources per sender */
    subnet_t source_storage[8];
    PyObject *sources; /* the sources rules.sources were parsed from (owned) */
    /* Lookups kept from one wake-up to the next while peers.routes and peers.senders are
     * the same objects (PeerTable swaps whole tables on every change). */
    PyObject *routes, *senders;
    uint32_t route_dst; /* the last destination looked up, its peer's: */
    int route_found;
    struct sockaddr_in route_sa;
    PyObject *route_prefix, *route_stats;
    struct in_addr rx_ip; /* the last sender looked up, its peers.senders entry */
    PyObject *rx_entry;
    /* Counts not yet added to the dataplane's counters and peers' stats (flush()) */
    Py_ssize_t counts[C_COUNT];
    Py_ssize_t tx_batch[BATCH_MAX + 1], rx_batch[BATCH_MAX + 1];
    pending_peer_t pending[PENDING_PEERS];
    int npending;
    double flushed_at;
    /* IN_DRAIN while tx() or rx() runs, IN_FLUSH while counts are added: the Python a
     * call may run (_no_route, _answer_arp, a hostile attribute) must not start another
     * wake-up on the same state, nor a flush inside a flush. */
    int busy;
    int ready; /* set once drains_new completed */
} drains_t;

#define IN_DRAIN 1
#define IN_FLUSH 2

static void forget_lookups(drains_t *d)
{
    Py_CLEAR(d->routes);
    Py_CLEAR(d->senders);
    Py_CLEAR(d->route_prefix);
    Py_CLEAR(d->route_stats);
    Py_CLEAR(d->rx_entry);
    d->route_found = 0;
}

/* peers.routes and peers.senders for this wake-up: the kept lookups go when either
 * table is a new one. */
static int tables(drains_t *d)
{
    PyObject *routes = get(d->peers, A_ROUTES);
    PyObject *senders = routes ? get(d->peers, A_SENDERS) : NULL;
    if (senders == NULL) {
        Py_XDECREF(routes);
        return 0;
    }
    if (!PyList_Check(routes) || !PyDict_Check(senders)) {
        PyErr_SetString(PyExc_TypeError, "peers.routes must be a list, peers.senders a dict");
        Py_DECREF(routes);
        Py_DECREF(senders);
        return 0;
    }
    if (routes != d->routes || senders != d->senders) {
        forget_lookups(d);
        d->routes = routes;
        d->senders = senders;
        return 1;
    }
    Py_DECREF(routes);
    Py_DECREF(senders);
    return 1;
}

/* The pending counts of a PeerStats (added to, or made), NULL when all PENDING_PEERS are
 * taken and flushing them failed. */
static int flush(drains_t *d);
static pending_peer_t *pending_for(drains_t *d, PyObject *stats)
{
    for (int i = 0; i < d->npending; i++)
        if (d->pending[i].stats == stats)
            return &d->pending[i];
    if (d->npending == PENDING_PEERS && !flush(d))
        return NULL;
    if (d->npending == PENDING_PEERS) { /* not reached: tx and rx refuse to run in a flush */
        PyErr_SetString(PyExc_RuntimeError, "Drains: no room for a peer's counts");
        return NULL;
    }
    pending_peer_t *p = &d->pending[d->npending++];
    *p = (pending_peer_t){.stats = Py_NewRef(stats)};
    return p;
}

/* n += *count and *count = 0 once added: a flush that fails halfway, tried again, adds
 * nothing twice. */
static int add_pending(PyObject *o, int name, Py_ssize_t *count)
{
    if (!add_attr(o, name, *count))
        return 0;
    *count = 0;
    return 1;
}

static int set_pending(PyObject *o, int name, double *at)
{
    if (*at && !set_float(o, name, *at))
        return 0;
    *at = 0;
    return 1;
}

/* Add the pending counts to the dataplane's counters and the peers' stats. Inside a
 * flush (a hostile attribute's Python asking for another) it adds nothing: the outer one
 * does. */
static int flush_counts(drains_t *d)
{
    d->flushed_at = monotonic();
    for (int c = 0; c < C_COUNT; c++)
        if (!add_pending(d->counters, counter_attrs[c], &d->counts[c]))
            return 0;
    if (!add_histogram(d->counters, A_TX_BATCH, d->tx_batch)
        || !add_histogram(d->counters, A_RX_BATCH, d->rx_batch))
        return 0;
    while (d->npending) {
        pending_peer_t *p = &d->pending[d->npending - 1];
        int ok = add_pending(p->stats, A_TX_PACKETS, &p->tx_packets)
              && add_pending(p->stats, A_TX_BYTES, &p->tx_bytes)
              && add_pending(p->stats, A_RX_PACKETS, &p->rx_packets)
              && add_pending(p->stats, A_RX_BYTES, &p->rx_bytes)
              && set_pending(p->stats, A_LAST_TX, &p->last_tx)
              && set_pending(p->stats, A_LAST_RX, &p->last_rx);
        if (!ok)
            return 0;
        PyObject *stats = p->stats;
        d->npending--; /* the entry gone before the reference: a destructor may run Python */
        Py_DECREF(stats);
    }
    return 1;
}

static int flush(drains_t *d)
{
    if (!d->ready || d->busy & IN_FLUSH) /* nothing counted yet, or being added */
        return 1;
    d->busy |= IN_FLUSH;
    int ok = flush_counts(d);
    d->busy &= ~IN_FLUSH;
    return ok;
}

/* The start of tx() and rx(): 0 (an exception set) when one is already running. */
static int enter(drains_t *d)
{
    if (!d->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Drains: not constructed");
        return 0;
    }
    if (d->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Drains: a wake-up inside a wake-up or a flush");
        return 0;
    }
    d->busy |= IN_DRAIN;
    return 1;
}

/* The end of a wake-up: its drops now (rare, and the drop log watches for new
 * reasons), the rest at the next flush, or now when the last is FLUSH_EVERY old. */
static int finish(drains_t *d, PyObject *const *names, const Py_ssize_t *drops, int n)
{
    for (int r = 0; r < n; r++) {
        if (!drops[r])
            continue;
        PyObject *mapping = get(d->counters, A_DROPS);
        int ok = mapping != NULL && add_counts(mapping, names, drops, n);
        Py_XDECREF(mapping);
        if (!ok)
            return 0;
        break;
    }
    return monotonic() - d->flushed_at < FLUSH_EVERY || flush(d);
}

/* Whether a trace is attached (dataplane.tap): then the wake-up goes to the Python
 * reference, which reports every packet. -1 on error. */
static int traced(drains_t *d)
{
    PyObject *tap = get(d->dp, A_TAP);
    if (tap == NULL)
        return -1;
    Py_DECREF(tap);
    return tap != Py_None;
}

/* -- TX: Drains.tx --------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t length;
    Py_ssize_t peer; /* index into the wake-up's peers */
} tx_packet_t;

typedef struct {
    struct sockaddr_in sa;
    PyObject *stats; /* the node's oldest lease's PeerStats (peers.senders), or NULL */
} tx_peer_t;

typedef struct {
    tx_packet_t *packets;
    Py_ssize_t npackets, packets_room;
    tx_peer_t *peers;
    Py_ssize_t npeers, peers_room;
    Py_ssize_t drops[T_COUNT];
    int gso_off;
    tx_packet_t local_packets[256];
    tx_peer_t local_peers[8];
} tx_t;

/* Room for one more element in a growing array (local storage first, then the heap). */
static int grow(void **items, Py_ssize_t used, Py_ssize_t *room, void *local, size_t item)
{
    if (used < *room)
        return 1;
    Py_ssize_t more = *room * 2;
    void *bigger = PyMem_Malloc(item * (size_t)more);
    if (bigger == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    memcpy(bigger, *items, item * (size_t)used);
    if (*items != local)
        PyMem_Free(*items);
    *items = bigger;
    *room = more;
    return 1;
}

static int keep(tx_t *t, Py_ssize_t length, Py_ssize_t peer)
{
    if (!grow((void **)&t->packets, t->npackets, &t->packets_room, t->local_packets,
              sizeof(tx_packet_t)))
        return 0;
    t->packets[t->npackets++] = (tx_packet_t){length, peer};
    return 1;
}

/* The wake-up's entry for a peer address (one per address: a GSO group's key); -1 when
 * there is no room. stats is borrowed from the drains' lookup (owned by the entry). */
static Py_ssize_t tx_peer(tx_t *t, const struct sockaddr_in *sa, PyObject *stats)
{
    for (Py_ssize_t i = 0; i < t->npeers; i++)
        if (t->peers[i].sa.sin_addr.s_addr == sa->sin_addr.s_addr
            && t->peers[i].sa.sin_port == sa->sin_port)
            return i;
    if (!grow((void **)&t->peers, t->npeers, &t->peers_room, t->local_peers, sizeof(tx_peer_t)))
        return -1;
    Py_XINCREF(stats);
    t->peers[t->npeers] = (tx_peer_t){.sa = *sa, .stats = stats};
    return t->npeers++;
}

/* PeerTable.lookup over peers.routes: the Peer holding dst (new reference), Py_None when
 * none does, NULL on error. */
static PyObject *route(PyObject *routes, uint32_t dst)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(routes); i++) {
        /* owned: a key's __eq__ (a hostile table) may empty the list */
        PyObject *item = Py_NewRef(PyList_GET_ITEM(routes, i)), *peer = NULL;
        long shift;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
            || !PyDict_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "peers.routes is a list of (shift, dict)");
            goto fail;
        }
        shift = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        if (shift == -1 && PyErr_Occurred())
            goto fail;
        if (shift < 0 || shift > 32) {
            PyErr_SetString(PyExc_ValueError, "a route's shift is 0..32");
            goto fail;
        }
        PyObject *key = PyLong_FromUnsignedLong((unsigned long)((uint64_t)dst >> shift));
        if (key == NULL)
            goto fail;
        peer = PyDict_GetItemWithError(PyTuple_GET_ITEM(item, 1), key);
        Py_XINCREF(peer);
        Py_DECREF(key);
        Py_DECREF(item);
        if (peer != NULL)
            return peer;
        if (PyErr_Occurred())
            return NULL;
        continue;
    fail:
        Py_DECREF(item);
        return NULL;
    }
    return Py_NewRef(Py_None);
}

/* d->route_* for dst: kept from the last lookup, or looked up (route_found 0: no peer,
 * or none with a prefix of our headroom). */
static int lookup_route(drains_t *d, uint32_t dst)
{
    if (d->route_prefix != NULL && d->route_dst == dst)
        return 1;
    Py_CLEAR(d->route_prefix);
    Py_CLEAR(d->route_stats);
    d->route_found = 0;
    PyObject *found = route(d->routes, dst);
    if (found == NULL)
        return 0;
    d->route_dst = dst;
    if (found == Py_None) {
        d->route_prefix = Py_NewRef(Py_None); /* a lookup kept: no route */
        Py_DECREF(found);
        return 1;
    }
    PyObject *prefix = get(found, A_PREFIX);
    PyObject *addr = prefix ? get(found, A_ADDR) : NULL;
    Py_DECREF(found);
    if (addr == NULL)
        goto fail;
    if (!PyBytes_Check(prefix)) {
        PyErr_SetString(PyExc_TypeError, "tx: a peer's prefix must be bytes");
        goto fail;
    }
    if (!parse_addr(addr, &d->route_sa))
        goto fail;
    PyObject *entry = sender(d->senders, &d->route_sa.sin_addr);
    if (entry == NULL && PyErr_Occurred())
        goto fail;
    if (entry != NULL) {
        d->route_stats = Py_NewRef(PyTuple_GET_ITEM(entry, 1));
        Py_DECREF(entry);
    }
    d->route_found = PyBytes_GET_SIZE(prefix) == d->headroom;
    d->route_prefix = prefix;
    Py_DECREF(addr);
    return 1;
fail:
    Py_XDECREF(prefix);
    Py_XDECREF(addr);
    return 0;
}

/* Stage 1, UdpDataplane._read_tun: drain the TUN into the arena (kept packets back to
 * back from offset 0), route, cut super-packets, finish partial checksums. */
static int tx_read(drains_t *d, tx_t *t)
{
    uint8_t *b = d->arena.buf;
    Py_ssize_t size = d->arena.len, headroom = d->headroom, budget = d->budget;
    Py_ssize_t limit = size - 2 * MAX_DATAGRAM - headroom - 3; /* checked in drains_new */
    int ok = 0;
    /* at most a partial checksum per kept packet, and each takes >= 20 bytes of the
     * arena: no more than size / 20 + 1 of them, whatever the budget (a size_t product of
     * which would wrap) */
    Py_ssize_t most = budget < size / 20 + 1 ? budget : size / 20 + 1;
    Py_ssize_t local_regions[256][3];
    Py_ssize_t (*regions)[3] = most <= 256 ? local_regions
                             : PyMem_Malloc(sizeof *regions * (size_t)most);
    Py_ssize_t nregions = 0, at = 0, peer = -1;
    uint8_t last_dst[4] = {0};
    int have_dst = 0;
    char detail[96];
    if (regions == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    for (Py_ssize_t n = 0; n < budget; n++) {
        if (at > limit)
            break;
        Py_ssize_t body = at + headroom;
        uint8_t hdr[10] = {0};
        struct iovec iov[2];
        int k = 0;
        if (d->vnet)
            iov[k++] = (struct iovec){hdr, 10};
        iov[k++] = (struct iovec){b + body, (size_t)(size - body)};
        ssize_t got;
        do
            got = readv(d->tun_fd, iov, k);
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (would_block(errno))
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        Py_ssize_t length = got - (d->vnet ? 10 : 0);
        if (length < 20 || b[body] >> 4 != 4) {
            t->drops[T_NOT_IPV4]++;
            continue;
        }
        if (!have_dst || memcmp(b + body + 16, last_dst, 4) != 0) {
            if (!lookup_route(d, be32(b + body + 16)))
                goto done;
            if (!d->route_found) {
                have_dst = 0;
                PyObject *packet = PyBytes_FromStringAndSize((const char *)b + body, length);
                PyObject *r = packet ? PyObject_CallMethodOneArg(d->dp, attr[A_NO_ROUTE], packet)
                                     : NULL;
                Py_XDECREF(packet);
                if (r == NULL)
                    goto done;
                Py_DECREF(r);
                continue;
            }
            if ((peer = tx_peer(t, &d->route_sa, d->route_stats)) < 0)
                goto done;
            memcpy(last_dst, b + body + 16, 4);
            have_dst = 1;
        }
        /* the prefix the packet was routed with: _no_route may have changed the tables */
        const uint8_t *prefix = (const uint8_t *)PyBytes_AS_STRING(d->route_prefix);
        if (d->tso && (hdr[1] || hdr[0] & VNET_NEEDS_CSUM)) {
            uint16_t gso_size, csum_start, csum_offset;
            memcpy(&gso_size, hdr + 4, 2);
            memcpy(&csum_start, hdr + 6, 2);
            memcpy(&csum_offset, hdr + 8, 2);
            if (hdr[1] == VNET_GSO_TCPV4) {
                Py_ssize_t out[3];
                const char *reason = cut_tcp4(b, size, at, length, gso_size, prefix, headroom,
                                              out, detail, sizeof detail);
                if (reason != NULL) {
                    t->drops[tx_reason(reason)]++;
                    continue;
                }
                for (Py_ssize_t i = 0; i < out[0]; i++)
                    if (!keep(t, i < out[0] - 1 ? out[1] : out[2], peer))
                        goto done;
                at += (out[0] - 1) * out[1] + out[2];
                d->counts[C_TX_TUN_SUPER]++;
                continue;
            }
            if (hdr[1] != VNET_GSO_NONE) {
                t->drops[T_GSO_UNSUPPORTED]++;
                continue;
            }
            /* encap.tso.partial_region */
            Py_ssize_t start = body + csum_start, field = start + csum_offset, end = body + length;
            if (!(body < start && start <= field && field <= end - 2)) {
                t->drops[T_BAD_CSUM_OFFSETS]++;
                continue;
            }
            regions[nregions][0] = start;
            regions[nregions][1] = end;
            regions[nregions][2] = field;
            nregions++;
        }
        if (headroom)
            memcpy(b + at, prefix, (size_t)headroom);
        if (!keep(t, headroom + length, peer))
            goto done;
        at = body + length;
    }
    ok = 1;
done:
    for (Py_ssize_t i = 0; i < nregions; i++) { /* encap.tso.finish_checksums */
        Py_ssize_t *r = regions[i];
        uint32_t c = ~fold(sum16(b + r[0], r[1] - r[0])) & 0xFFFF;
        if (c == 0 && r[2] - r[0] == 6)
            c = 0xFFFF;
        put16(b + r[2], c);
    }
    if (regions != local_regions)
        PyMem_Free(regions);
    return ok;
}

/* One send of packets datagrams (bytes) to the wake-up's peer: the batch-size histogram
 * and the peer's counts (UdpDataplane._sent). */
static int tx_sent(drains_t *d, tx_t *t, Py_ssize_t peer, Py_ssize_t packets, Py_ssize_t bytes,
                   double now)
{
    d->counts[C_TX_PACKETS] += packets;
    d->counts[C_TX_BYTES] += bytes;
    d->tx_batch[packets < BATCH_MAX ? packets : BATCH_MAX]++;
    PyObject *stats = t->peers[peer].stats;
    if (stats == NULL)
        return 1;
    pending_peer_t *p = pending_for(d, stats);
    if (p == NULL)
        return 0;
    p->tx_packets += packets;
    p->tx_bytes += bytes;
    p->last_tx = now;
    return 1;
}

/* Stage 2 (plain), UdpDataplane._send_each: one sendto per packet start:end, the first
 * at arena offset at. */
static int tx_send_each(drains_t *d, tx_t *t, Py_ssize_t start, Py_ssize_t end, Py_ssize_t at,
                        double now)
{
    const uint8_t *b = d->arena.buf;
    for (Py_ssize_t i = start; i < end; i++) {
        const tx_packet_t *p = &t->packets[i];
        const tx_peer_t *peer = &t->peers[p->peer];
        ssize_t r;
        do
            r = sendto(d->sock_fd, b + at, (size_t)p->length, 0,
                       (const struct sockaddr *)&peer->sa, sizeof peer->sa);
        while (r < 0 && errno == EINTR);
        at += p->length;
        if (r < 0) {
            t->drops[would_block(errno) ? T_SOCKET_FULL : T_SEND_ERROR]++;
            continue;
        }
        if (!tx_sent(d, t, p->peer, 1, p->length, now))
            return 0;
    }
    return 1;
}

/* Whether the dataplane has seen a GSO send work (its _gso_sent; the reference path may
 * have set it). -1 on error. */
static int gso_worked(drains_t *d)
{
    if (!d->gso_sent && !get_bool(d->dp, A_GSO_SENT, &d->gso_sent))
        return -1;
    return d->gso_sent;
}

/* Stage 2 (GSO), UdpDataplane._send_groups with encap.gso.plan_groups' grouping: one
 * sendmsg per group, the kernel cutting it into one datagram per packet. */
static int tx_send_groups(drains_t *d, tx_t *t, double now)
{
    Py_ssize_t at = 0, n = t->npackets;
    tx_packet_t *p = t->packets;
    const uint8_t *b = d->arena.buf;
    for (Py_ssize_t start = 0, end; start < n; start = end) {
        Py_ssize_t size = p[start].length, previous = size, total = size;
        for (end = start + 1; end < n; end++) {
            Py_ssize_t length = p[end].length;
            if (!(previous == size && length <= size && p[end].peer == p[start].peer
                  && total + length <= MAX_GSO_BYTES && end - start < MAX_RUN))
                break;
            total += length;
            previous = length;
        }
        Py_ssize_t first = at;
        at += total;
        if (end - start == 1) {
            if (!tx_send_each(d, t, start, end, first, now))
                return 0;
            continue;
        }
        const tx_peer_t *peer = &t->peers[p[start].peer];
        union {
            char buf[CMSG_SPACE(sizeof(uint16_t))];
            struct cmsghdr align;
        } control;
        memset(&control, 0, sizeof control);
        struct iovec iov = {(void *)(b + first), (size_t)total};
        struct msghdr msg = {
            .msg_name = (void *)&peer->sa,
            .msg_namelen = sizeof peer->sa,
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = control.buf,
            .msg_controllen = sizeof control.buf,
        };
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t segment = (uint16_t)size; /* <= MAX_GSO_BYTES */
        memcpy(CMSG_DATA(c), &segment, sizeof segment);
        ssize_t r;
        do
            r = sendmsg(d->sock_fd, &msg, 0);
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            int e = errno;
            if (would_block(e)) {
                t->drops[T_SOCKET_FULL] += end - start;
                continue;
            }
            /* EIO: the route's device cannot checksum a GSO send, so GSO goes off for
             * good; EINVAL before any GSO send worked: the kernel refuses the cmsg (the
             * reference's comment says more) */
            int worked = e == EINVAL ? gso_worked(d) : 1;
            if (worked < 0)
                return 0;
            if (e == EIO || (e == EINVAL && !worked))
                t->gso_off = 1;
            if (!tx_send_each(d, t, start, end, first, now))
                return 0;
            continue;
        }
        if (!d->gso_sent) { /* the first GSO send that worked */
            if (!set(d->dp, A_GSO_SENT, Py_True))
                return 0;
            d->gso_sent = 1;
        }
        d->counts[C_TX_GSO_SENDS]++;
        if (!tx_sent(d, t, p[start].peer, end - start, total, now))
            return 0;
    }
    return 1;
}

/* One wake-up, never inside another (they share the arena and the receive buffer): the
 * Python reference method when a trace is attached (it reports every packet), else the C
 * stages. */
static PyObject *wake(drains_t *d, int reference, PyObject *(*stages)(drains_t *))
{
    if (!enter(d))
        return NULL;
    int trace = traced(d);
    PyObject *result = NULL;
    if (trace > 0)
        result = PyObject_CallMethodNoArgs(d->dp, attr[reference]);
    else if (trace == 0)
        result = stages(d);
    d->busy &= ~IN_DRAIN;
    return result;
}

/* UdpDataplane.on_tun_readable */
static PyObject *tx_wake(drains_t *d);
static PyObject *drains_tx(drains_t *d, PyObject *unused)
{
    return wake(d, A_ON_TUN_READABLE, tx_wake);
}

static PyObject *tx_wake(drains_t *d)
{
    int gso;
    if (!get_bool(d->dp, A_GSO, &gso) || !tables(d))
        return NULL;
    tx_t storage, *t = &storage;
    memset(t, 0, offsetof(tx_t, local_packets));
    t->packets = t->local_packets;
    t->packets_room = sizeof t->local_packets / sizeof t->local_packets[0];
    t->peers = t->local_peers;
    t->peers_room = sizeof t->local_peers / sizeof t->local_peers[0];
    int ok = tx_read(d, t);
    if (ok && t->npackets) {
        double now = monotonic();
        /* one packet (a ping, an ACK at low rate): a sendto, without planning groups */
        ok = gso && t->npackets > 1 ? tx_send_groups(d, t, now)
                                    : tx_send_each(d, t, 0, t->npackets, 0, now);
    }
    /* what was counted is added even when an exception ends the wake-up */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    int finished = (!t->gso_off || set(d->dp, A_GSO, Py_False))
                && finish(d, tx_reason_strings, t->drops, T_COUNT);
    if (type != NULL)
        PyErr_Restore(type, value, traceback);
    for (Py_ssize_t i = 0; i < t->npeers; i++)
        Py_XDECREF(t->peers[i].stats);
    if (t->packets != t->local_packets)
        PyMem_Free(t->packets);
    if (t->peers != t->local_peers)
        PyMem_Free(t->peers);
    return ok && finished && type == NULL ? Py_NewRef(Py_None) : NULL;
}

/* -- RX: Drains.rx --------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t drops[R_ALL];
} rx_t;

/* The TUN writes of a plan; failed ones counted as rx_tun_full / rx_tun_error. */
static void write_plan(int fd, uint8_t *d, plan_t *plan, int vnet, Py_ssize_t out[3])
{
    static const uint8_t plain[10] = {0};
    for (Py_ssize_t i = 0; i < plan->nwrites; i++) {
        const plan_write_t *w = &plan->writes[i];
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
                const piece_t *p = &plan->pieces[w->first + k];
                iov[n++] = (struct iovec){d + p->start, (size_t)(p->end - p->start)};
            }
            carried = w->count;
            length = w->total + (w->count - 1) * w->header_length;
        }
        ssize_t r;
        do
            r = writev(fd, iov, n);
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            plan->drops[would_block(errno) ? R_TUN_FULL : R_TUN_ERROR] += carried;
            continue;
        }
        out[0] += carried;
        out[1] += length;
        out[2] += w->count > 1;
    }
}

/* peers.senders[source] for a receive: kept from the last, or looked up; borrowed in
 * d->rx_entry, NULL (no error) for a node that is not a peer. */
static PyObject *rx_sender(drains_t *d, const struct in_addr *ip)
{
    if (d->rx_entry != NULL && d->rx_ip.s_addr == ip->s_addr)
        return d->rx_entry == Py_None ? NULL : d->rx_entry;
    Py_CLEAR(d->rx_entry);
    PyObject *entry = sender(d->senders, ip);
    if (entry == NULL && PyErr_Occurred())
        return NULL;
    d->rx_entry = entry != NULL ? entry : Py_NewRef(Py_None);
    d->rx_ip = *ip;
    return entry;
}

/* UdpDataplane._deliver: validate the segment-byte datagrams of the RX buffer's
 * [0:size] (one receive from source) and write them to the TUN. */
static int rx_deliver(drains_t *d, rx_t *x, const struct sockaddr_in *source, Py_ssize_t size,
                      Py_ssize_t segment)
{
    Py_ssize_t count = size / segment + (size % segment != 0);
    d->rx_batch[count < BATCH_MAX ? count : BATCH_MAX]++;
    PyObject *entry = rx_sender(d, &source->sin_addr);
    if (entry == NULL) {
        if (PyErr_Occurred())
            return 0;
        x->drops[R_UNKNOWN_PEER] += count;
        return 1;
    }
    Py_INCREF(entry); /* the Python below (_answer_arp) may drop the kept one */
    PyObject *sources = PyTuple_GET_ITEM(entry, 0), *stats = PyTuple_GET_ITEM(entry, 1);
    uint8_t *data = d->rx.buf;
    int ok = 0, empty = PyObject_Not(sources);
    plan_t plan;
    plan.writes = NULL;
    plan.pieces = NULL;
    plan.arp = NULL;
    if (empty) {
        if (empty > 0) {
            x->drops[R_UNKNOWN_PEER] += count;
            ok = 1;
        }
        goto done;
    }
    if (sources != d->sources) { /* the receives mostly come from one sender */
        sources_free(&d->rules, d->source_storage);
        Py_CLEAR(d->sources);
        if (!parse_sources(&d->rules, d->source_storage, sources))
            goto done;
        d->sources = Py_NewRef(sources);
    }
    if (size > 0xFFFF || size > d->rx.len) { /* not reached: the loop never gathers more */
        PyErr_Format(PyExc_ValueError, "a receive of %zd bytes", size);
        goto done;
    }
    if (!plan_alloc(&plan, count))
        goto done;
    make_plan(data, size, segment, &d->rules, d->coalesce, d->mtu, &plan);
    Py_ssize_t out[3] = {0, 0, 0};
    write_plan(d->tun_fd, data, &plan, d->vnet, out);
    for (int r = 1; r < R_COUNT; r++)
        x->drops[r] += plan.drops[r];
    d->counts[C_RX_PACKETS] += out[0];
    d->counts[C_RX_BYTES] += out[1];
    d->counts[C_RX_TUN_SUPER] += out[2];
    if (out[0]) {
        pending_peer_t *p = pending_for(d, stats);
        if (p == NULL)
            goto done;
        p->rx_packets += out[0];
        p->rx_bytes += out[1];
        p->last_rx = monotonic();
    }
    if (plan.narp) { /* vxlan: ARP requests, answered before the buffer is reused */
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &source->sin_addr, ip, sizeof ip);
        PyObject *peer = Py_BuildValue("(si)", ip, (int)ntohs(source->sin_port));
        if (peer == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < plan.narp; i++) {
            Py_ssize_t at = plan.arp[i], end = at + segment < size ? at + segment : size;
            PyObject *from = PyLong_FromSsize_t(at), *to = PyLong_FromSsize_t(end);
            PyObject *r = from && to ? PyObject_CallMethodObjArgs(d->dp, attr[A_ANSWER_ARP], from,
                                                                  to, peer, NULL)
                                     : NULL;
            Py_XDECREF(from);
            Py_XDECREF(to);
            if (r == NULL) {
                Py_DECREF(peer);
                goto done;
            }
            Py_DECREF(r);
        }
        Py_DECREF(peer);
    }
    ok = 1;
done:
    plan_free(&plan);
    Py_DECREF(entry);
    return ok;
}

static int gro_size(struct msghdr *msg, Py_ssize_t size) /* encap.gso.gro_size */
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO
            && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int segment;
            memcpy(&segment, CMSG_DATA(c), sizeof segment);
            return segment > 0 ? segment : (int)size;
        }
    }
    return (int)size;
}

static inline int same_source(const struct sockaddr_in *a, const struct sockaddr_in *b)
{
    return a->sin_addr.s_addr == b->sin_addr.s_addr && a->sin_port == b->sin_port;
}

/* UdpDataplane.on_socket_readable_gro's loop (gro), else on_socket_readable's. */
static int rx_loop(drains_t *d, rx_t *x)
{
    uint8_t *data = d->rx.buf;
    Py_ssize_t moved = 0, at = 0, run_size = 0, room = d->rx.len;
    struct sockaddr_in run_source = {0};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    while (moved < d->budget) {
        struct sockaddr_in source;
        struct iovec iov = {data + at, (size_t)(room - at)};
        struct msghdr msg = {
            .msg_name = &source,
            .msg_namelen = sizeof source,
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = d->gro ? control.buf : NULL,
            .msg_controllen = d->gro ? sizeof control.buf : 0,
        };
        ssize_t got;
        do
            got = recvmsg(d->sock_fd, &msg, 0);
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (would_block(errno))
                break;
            x->drops[R_SOCKET_ERROR]++;
            moved++;
            continue;
        }
        if (msg.msg_namelen < sizeof source || source.sin_family != AF_INET)
            memset(&source, 0, sizeof source);
        Py_ssize_t size = got;
        if (!size) { /* an empty datagram (anyone may send one) */
            x->drops[R_NOT_IPV4]++;
            moved++;
            continue;
        }
        if (!d->gro) {
            moved++;
            if (!rx_deliver(d, x, &source, size, size))
                return 0;
            continue;
        }
        Py_ssize_t segment = msg.msg_controllen ? gro_size(&msg, size) : size;
        moved += size / segment + (size % segment != 0);
        if (msg.msg_flags & MSG_TRUNC) { /* more than 64 KiB coalesced */
            x->drops[R_TRUNCATED]++;
            continue;
        }
        int single = segment == size;
        if (at) {
            if (single && same_source(&source, &run_source) && size <= run_size) {
                at += size;
                if (size < run_size || at + run_size > MAX_DATAGRAM) { /* a short one ends it */
                    Py_ssize_t end = at;
                    at = 0;
                    if (!rx_deliver(d, x, &run_source, end, run_size))
                        return 0;
                }
                continue;
            }
            Py_ssize_t end = at;
            at = 0;
            if (!rx_deliver(d, x, &run_source, end, run_size)) /* then this one from the front */
                return 0;
            memmove(data, data + end, (size_t)size);
        }
        if (single) {
            if (2 * size > MAX_DATAGRAM) { /* a second one would not fit: nothing to gather */
                if (!rx_deliver(d, x, &source, size, size))
                    return 0;
                continue;
            }
            at = run_size = size;
            run_source = source;
            continue;
        }
        d->counts[C_RX_GRO_RECEIVES]++;
        if (!rx_deliver(d, x, &source, size, segment))
            return 0;
    }
    if (at && !rx_deliver(d, x, &run_source, at, run_size))
        return 0;
    return 1;
}

/* UdpDataplane.on_socket_readable_gro (on_socket_readable without gro) */
static PyObject *rx_wake(drains_t *d);
static PyObject *drains_rx(drains_t *d, PyObject *unused)
{
    return wake(d, d->gro ? A_ON_SOCKET_READABLE_GRO : A_ON_SOCKET_READABLE, rx_wake);
}

static PyObject *rx_wake(drains_t *d)
{
    if (!tables(d))
        return NULL;
    rx_t x;
    memset(&x, 0, sizeof x);
    int ok = rx_loop(d, &x);
    PyObject *type, *value, *traceback; /* counts are added even when an exception ends it */
    PyErr_Fetch(&type, &value, &traceback);
    int finished = finish(d, reason_strings, x.drops, R_ALL);
    if (type != NULL)
        PyErr_Restore(type, value, traceback);
    return ok && finished && type == NULL ? Py_NewRef(Py_None) : NULL;
}

/* -- Drains: making one, the type ------------------------------------------------------- */

static PyObject *drains_flush(drains_t *d, PyObject *unused)
{
    return flush(d) ? Py_NewRef(Py_None) : NULL;
}

static int drains_traverse(drains_t *d, visitproc visit, void *arg)
{
    Py_VISIT(d->dp);
    Py_VISIT(d->counters);
    Py_VISIT(d->peers);
    Py_VISIT(d->arena_obj);
    Py_VISIT(d->rx_obj);
    Py_VISIT(d->sources);
    Py_VISIT(d->routes);
    Py_VISIT(d->senders);
    Py_VISIT(d->route_prefix);
    Py_VISIT(d->route_stats);
    Py_VISIT(d->rx_entry);
    for (int i = 0; i < d->npending; i++)
        Py_VISIT(d->pending[i].stats);
    return 0;
}

static int drains_clear(drains_t *d)
{
    forget_lookups(d);
    while (d->npending) {
        d->npending--; /* not inside Py_CLEAR: a macro, it evaluates its argument twice */
        Py_CLEAR(d->pending[d->npending].stats);
    }
    sources_free(&d->rules, d->source_storage);
    Py_CLEAR(d->sources);
    if (d->arena.obj != NULL)
        PyBuffer_Release(&d->arena);
    if (d->rx.obj != NULL)
        PyBuffer_Release(&d->rx);
    Py_CLEAR(d->arena_obj);
    Py_CLEAR(d->rx_obj);
    Py_CLEAR(d->dp);
    Py_CLEAR(d->counters);
    Py_CLEAR(d->peers);
    return 0;
}

static void drains_dealloc(drains_t *d)
{
    PyObject_GC_UnTrack(d);
    drains_clear(d);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyObject *drains_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"dataplane", "budget", NULL};
    PyObject *dp, *tun = NULL, *own = NULL, *vxlan = NULL;
    Py_ssize_t budget;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On", keywords, &dp, &budget))
        return NULL;
    drains_t *d = (drains_t *)type->tp_alloc(type, 0); /* zeroed */
    if (d == NULL)
        return NULL;
    /* Out of the collector's sight until complete: the getters below run Python, which
     * must not find (gc.get_objects) and call a half-made Drains. */
    PyObject_GC_UnTrack(d);
    d->rules.sources = d->source_storage;
    d->dp = Py_NewRef(dp);
    d->budget = budget;
    d->flushed_at = monotonic();
    int tun_gso;
    if ((tun = get(dp, A_TUN)) == NULL || !get_fd(tun, A_FD, &d->tun_fd)
        || !get_bool(tun, A_VNET_HDR, &d->vnet) || !get_fd(dp, A_SOCK, &d->sock_fd)
        || !get_ssize(dp, A_HEADROOM, &d->headroom) || !get_bool(dp, A_TSO, &d->tso)
        || !get_bool(dp, A_GRO, &d->gro) || !get_bool(dp, A_TUN_GSO, &tun_gso)
        || !get_bool(dp, A_GSO_SENT, &d->gso_sent) || !get_ssize(dp, A_MTU, &d->mtu)
        || (own = get(dp, A_OWN)) == NULL || (vxlan = get(dp, A_VXLAN_RULES)) == NULL
        || !parse_target(&d->rules, own, vxlan)
        || (d->peers = get(dp, A_PEERS)) == NULL
        || (d->counters = get(dp, A_COUNTERS)) == NULL
        || (d->arena_obj = get(dp, A_TX_ARENA)) == NULL
        || PyObject_GetBuffer(d->arena_obj, &d->arena, PyBUF_WRITABLE) < 0
        || (d->rx_obj = get(dp, A_RX_BUFFER)) == NULL
        || PyObject_GetBuffer(d->rx_obj, &d->rx, PyBUF_WRITABLE) < 0)
        goto fail;
    d->coalesce = tun_gso && d->vnet; /* super-packets need the virtio_net_hdr */
    /* TX: room for one more read of any size, and for cutting it into segments (the
     * headroom checked first: the difference must not overflow); RX: a gathered run stays
     * within the first 64 KiB, and the next receive always has room for a datagram. */
    if (d->headroom < 0 || d->headroom > d->arena.len
        || d->arena.len - d->headroom < 2 * MAX_DATAGRAM + 3) {
        PyErr_SetString(PyExc_ValueError, "Drains: the TX arena is too small for its headroom");
        goto fail;
    }
    if (d->rx.len < 2 * MAX_DATAGRAM) {
        PyErr_SetString(PyExc_ValueError, "Drains: the receive buffer is under 128 KiB");
        goto fail;
    }
    Py_DECREF(tun);
    Py_DECREF(own);
    Py_DECREF(vxlan);
    d->ready = 1;
    PyObject_GC_Track(d);
    return (PyObject *)d;
fail:
    Py_XDECREF(tun);
    Py_XDECREF(own);
    Py_XDECREF(vxlan);
    Py_DECREF(d);
    return NULL;
}

static PyMethodDef drains_methods[] = {
    {"tx", (PyCFunction)drains_tx, METH_NOARGS,
     "UdpDataplane.on_tun_readable: read the TUN (up to budget reads), route, cut, send."},
    {"rx", (PyCFunction)drains_rx, METH_NOARGS,
     "UdpDataplane.on_socket_readable_gro (on_socket_readable without gro): receive, "
     "gather, validate, write to the TUN."},
    {"flush", (PyCFunction)drains_flush, METH_NOARGS,
     "Add the counts not yet added to the dataplane's counters and the peers' stats."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject drains_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "encap._native.Drains",
    .tp_basicsize = sizeof(drains_t),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Drains(dataplane, budget): a dataplane's reader callbacks in C (tx, rx), "
              "reading its fixed attributes once; counts are added by flush() (at least "
              "every second, and before Counters.snapshot()), drops at once.",
    .tp_new = drains_new,
    .tp_dealloc = (destructor)drains_dealloc,
    .tp_traverse = (traverseproc)drains_traverse,
    .tp_clear = (inquiry)drains_clear,
    .tp_methods = drains_methods,
};

/* -- the module ------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"segment_tcp4", segment_tcp4, METH_VARARGS,
     "segment_tcp4(buf, at, length, gso_size, prefix) -> (count, stride, last): encap.tso's."},
    {"plan_groups", plan_groups, METH_VARARGS,
     "plan_groups(lengths, keys, max_segments=64, max_bytes=65000): encap.gso's."},
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
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    PyObject *errors = PyImport_ImportModule("encap.errors");
    if (errors == NULL)
        return -1;
    codec_error = PyObject_GetAttrString(errors, "CodecError");
    Py_DECREF(errors);
    if (codec_error == NULL)
        return -1;
    for (int r = 1; r < R_ALL; r++) {
        if (reason_names[r] == NULL)
            continue;
        reason_strings[r] = PyUnicode_InternFromString(reason_names[r]);
        if (reason_strings[r] == NULL)
            return -1;
    }
    for (int r = 1; r < T_COUNT; r++) {
        tx_reason_strings[r] = PyUnicode_InternFromString(tx_reason_names[r]);
        if (tx_reason_strings[r] == NULL)
            return -1;
    }
    for (int i = 0; i < A_COUNT; i++) {
        attr[i] = PyUnicode_InternFromString(attr_names[i]);
        if (attr[i] == NULL)
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
    if (PyType_Ready(&drains_type) < 0 || PyModule_AddType(module, &drains_type) < 0)
        return -1;
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
