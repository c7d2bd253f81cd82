/* encap._native: UDP GSO batches (TX) and GRO receives (RX). Reference: encap/gso.py,
 * rule for rule:
 *
 *   gro_size                              gro_size
 *   plan_groups                           plan_groups (TX: consecutive packets to a peer)
 *   drop_reason (check_inner, l4_check,   drop_reason, l4_checksum_reason, _options_ok
 *     options_ok)
 *   check_vxlan                           vxlan_reason
 *   valid_pieces, plan_tun_writes         valid_pieces, plan_tun_writes, _emit (RX: the
 *     (make_plan, super_header)           TUN write plan), tcp_super_header
 *
 * Drains.rx (drains_receive.c) runs the same plan (make_plan) and writes it.
 * tests/encap/test_native.py proves them equal to the reference; tests/encap/test_rx.py
 * checks both against scapy.
 */

/* Linux constants (include/uapi/linux/udp.h), as encap/gso.py has them */
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#define MAX_RUN 64 /* encap.gso.MAX_SEGMENTS */
#define MAX_GSO_BYTES 65000 /* encap.gso.MAX_GSO_BYTES */

/* -- RX: gro_size ---------------------------------------------------------------------- */

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

/* -- TX: plan_groups (encap.gso.plan_groups) --------------------------------------------- */

/* A group's byte total: the reference sums Python ints, which never wrap. */
#ifdef __SIZEOF_INT128__
typedef __int128 total_t;
#else
typedef long long total_t; /* Py_ssize_t is 32 bits where there is no __int128 */
#endif

/* groups.append((start, end)); 0 on error. */
static int append_group(PyObject *groups, Py_ssize_t start, Py_ssize_t end)
{
    PyObject *g = Py_BuildValue("(nn)", start, end);
    if (g == NULL || PyList_Append(groups, g) < 0) {
        Py_XDECREF(g);
        return 0;
    }
    Py_DECREF(g);
    return 1;
}

/* key == group_key by __eq__, which runs Python: the lists (when they are lists) may have
 * changed, and fewer than count items is an IndexError. 1, 0, or -1 on error. */
static int same_key(PyObject *key, PyObject *group_key, PyObject *lengths, PyObject *keys,
                    Py_ssize_t count)
{
    PyObject *k = Py_NewRef(key);
    int same = PyObject_RichCompareBool(k, group_key, Py_EQ);
    Py_DECREF(k);
    if (same < 0)
        return -1;
    if (PySequence_Fast_GET_SIZE(lengths) < count || PySequence_Fast_GET_SIZE(keys) < count) {
        PyErr_SetString(PyExc_IndexError, "the lists shrank during plan_groups");
        return -1;
    }
    return same;
}

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
                same = same_key(key[i], group_key, lengths, keys, count);
                if (same < 0)
                    goto done;
                len = PySequence_Fast_ITEMS(lengths); /* __eq__ may have changed the lists */
                key = PySequence_Fast_ITEMS(keys);
            }
        }
        if (same) {
            total += length;
            previous = length;
            continue;
        }
        if (!append_group(groups, start, i))
            goto done;
        start = i;
        Py_SETREF(group_key, Py_NewRef(key[i]));
        size = previous = length;
        total = length;
    }
    if (!append_group(groups, start, count))
        goto done;
    result = Py_NewRef(groups);
done:
    Py_XDECREF(group_key);
    Py_XDECREF(groups);
    Py_XDECREF(keys);
    Py_XDECREF(lengths);
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

/* The write of a packet that passed check_inner, d[start:end], at w (the plan's next):
 * with coalesce, one TCP packet beyond the TUN's MTU as a super-packet of mtu-sized
 * segments, or a TCP segment with data and flags exactly ACK as the first of a run, left
 * open (1; *expect the next segment's sequence number); else the packet alone. */
static inline int open_write(const uint8_t *d, Py_ssize_t start, Py_ssize_t end, int coalesce,
                             Py_ssize_t mtu, plan_t *plan, plan_write_t *w, uint32_t *expect)
{
    Py_ssize_t length = end - start;
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
        return 0;
    }
    if (coalesce && simple_tcp && length > 40 && d[start + 33] == ACK) {
        Py_ssize_t offset = d[start + 32] >> 4;
        if (offset >= 5 && length > 20 + offset * 4) {
            *w = (plan_write_t){.head = start, .head_end = end, .header_length = 20 + offset * 4,
                                .total = length, .run_length = length,
                                .first = plan->npieces, .count = 1};
            plan->pieces[plan->npieces++] = (piece_t){start + w->header_length, end};
            *expect = be32(d + start + 24) + (uint32_t)(length - w->header_length);
            return 1;
        }
    }
    *w = (plan_write_t){.head = start, .head_end = end};
    plan->nwrites++;
    return 0;
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
        run = open_write(d, start, end, coalesce, mtu, plan, w, &expect);
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

/* drops[names[r]] += counts[r] for every r with a count, through the mapping protocol (so
 * a Counter's or overlay.observe.drop_log.Drops's __missing__ runs as for `drops[r] += 1`). */
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

/* A write of the plan as the reference returns it, a new reference: valid_pieces'
 * (start, end) when not coalesce, else plan_tun_writes' ([buffers], packets, bytes): the
 * plain virtio_net_hdr and the packet, or the run's super-packet header and its payloads,
 * as copies (bytes). */
static PyObject *write_item(const uint8_t *d, const plan_t *plan, const plan_write_t *w,
                            int coalesce)
{
    if (!coalesce)
        return Py_BuildValue("nn", w->head, w->head_end);
    if (w->count == 0)
        return Py_BuildValue("[y#y#]nn", "\0\0\0\0\0\0\0\0\0\0", (Py_ssize_t)10,
                             (const char *)d + w->head, w->head_end - w->head, (Py_ssize_t)1,
                             w->head_end - w->head);
    uint8_t vnet[10], header[120];
    super_header(d, w, vnet, header);
    PyObject *buffers = Py_BuildValue("[y#y#]", (const char *)vnet, (Py_ssize_t)10,
                                      (const char *)header, w->header_length);
    for (Py_ssize_t k = 0; buffers != NULL && k < w->count; k++) {
        const piece_t *p = &plan->pieces[w->first + k];
        PyObject *b = PyBytes_FromStringAndSize((const char *)d + p->start, p->end - p->start);
        if (b == NULL || PyList_Append(buffers, b) < 0)
            Py_CLEAR(buffers);
        Py_XDECREF(b);
    }
    return buffers == NULL ? NULL
         : Py_BuildValue("Nnn", buffers, w->count, w->total + (w->count - 1) * w->header_length);
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
        PyObject *item = write_item(d, &plan, &plan.writes[i], coalesce);
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
