/* encap._native: the receive rules of vxlan's IPv6 half. Reference: encap/ipv6.py, rule
 * for rule:
 *
 *   valid_pieces6 (check_vxlan6, then       valid_pieces6 (vxlan_reason6, then
 *     check_inner6: walk6, l4_check6)       drop_reason6: upper_layer, l4_checksum_reason6)
 *   plan_tun_writes6 (super_write6,         plan_tun_writes6 (tcp6_super_header), with
 *     same_flow6)                           copies (bytes) where it has memoryviews
 *
 * tests/encap/test_native.py proves it equal to the reference (tests/encap/test_ipv6.py
 * checks the reference against scapy). Every offset is checked against the datagram's
 * end before it is read.
 */

enum {
    V6_OK,
    V6_TRUNCATED,
    V6_BAD_VERSION,
    V6_JUMBO,
    V6_BAD_LENGTH,
    V6_BAD_EXT,
    V6_EXT_TOO_LONG,
    V6_BAD_NEXT,
    V6_FOREIGN,
    V6_NOT_OURS,
    V6_BAD_L4_HDR,
    V6_BAD_L4_CSUM,
    V6_VX_TRUNC,
    V6_VX_FLAGS,
    V6_VX_VNI,
    V6_VX_ETHER,
    V6_VX_MAC,
    V6_COUNT,
    V6_NDP = V6_COUNT, /* not a drop: maybe a neighbour solicitation, for the caller */
};

static const char *const v6_reason_names[V6_COUNT] = {
    NULL,
    "rx_ipv6_truncated",
    "rx_ipv6_bad_version",
    "rx_ipv6_jumbo",
    "rx_ipv6_bad_length",
    "rx_ipv6_bad_ext_header",
    "rx_ipv6_ext_chain_too_long",
    "rx_ipv6_bad_next_header",
    "rx_foreign_source",
    "rx_not_our_subnet",
    "rx_bad_l4_header",
    "rx_bad_l4_checksum",
    "rx_vxlan_truncated",
    "rx_vxlan_bad_flags",
    "rx_vxlan_wrong_vni",
    "rx_vxlan_bad_ethertype",
    "rx_vxlan_foreign_mac",
};
static PyObject *v6_reason_strings[V6_COUNT];

/* (network >> shift, shift) as Python passes it, kept as the 128-bit network (hi, lo). */
typedef struct {
    uint64_t hi, lo;
    int shift; /* 0..128 */
} subnet6_t;

static inline uint64_t be64(const uint8_t *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

/* encap.ipv6: address >> shift == network >> shift */
static inline int inside6(const uint8_t *address, const subnet6_t *s)
{
    uint64_t hi = be64(address), lo = be64(address + 8);
    if (s->shift >= 128)
        return 1;
    if (s->shift >= 64)
        return hi >> (s->shift - 64) == s->hi >> (s->shift - 64);
    return hi == s->hi && lo >> s->shift == s->lo >> s->shift;
}

/* A subnet tuple: 0 <= shift <= 128 and (network >> shift) << shift within 128 bits, else
 * ValueError (the reference would only never match it). */
static int parse_subnet6(PyObject *item, subnet6_t *out)
{
    PyObject *network;
    int shift;
    if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "O!i", &PyLong_Type, &network, &shift)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "a subnet is a (network >> shift, shift) tuple");
        return 0;
    }
    PyObject *zero = PyLong_FromLong(0);
    int negative = zero ? PyObject_RichCompareBool(network, zero, Py_LT) : -1;
    Py_XDECREF(zero);
    if (negative < 0)
        return 0;
    if (shift < 0 || shift > 128 || negative) {
        PyErr_SetString(PyExc_ValueError, "a subnet needs 0 <= shift <= 128, a network >= 0");
        return 0;
    }
    int ok = 0;
    PyObject *shift_obj = PyLong_FromLong(shift), *sixty_four = PyLong_FromLong(64);
    PyObject *full = shift_obj ? PyNumber_Lshift(network, shift_obj) : NULL;
    PyObject *hi = full && sixty_four ? PyNumber_Rshift(full, sixty_four) : NULL;
    if (hi != NULL) {
        unsigned long long h = PyLong_AsUnsignedLongLong(hi);
        if (h == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "a subnet's network is beyond 128 bits");
        } else {
            out->hi = h;
            out->lo = PyLong_AsUnsignedLongLongMask(full);
            out->shift = shift;
            ok = !PyErr_Occurred();
        }
    }
    Py_XDECREF(shift_obj);
    Py_XDECREF(sixty_four);
    Py_XDECREF(full);
    Py_XDECREF(hi);
    return ok;
}

typedef struct {
    subnet6_t *sources;
    Py_ssize_t nsources;
    subnet6_t destination;
    uint8_t vni[3], mac[6], solicited[6];
} rules6_t;

/* encap.ipv6.upper_layer: the extension headers walked; V6_OK with (*protocol, *l4,
 * *checked) or the drop reason. */
static int walk6(const uint8_t *d, Py_ssize_t start, Py_ssize_t end, int *protocol,
                 Py_ssize_t *l4, int *checked)
{
    int p = d[start + 6];
    Py_ssize_t at = start + 40;
    *checked = 1;
    for (int count = 0; count <= 8; count++) {
        if (p != 0 && p != 43 && p != 44 && p != 51 && p != 60) {
            *protocol = p;
            *l4 = at;
            return V6_OK;
        }
        if (count == 8)
            return V6_EXT_TOO_LONG;
        if (p == 0 && count)
            return V6_BAD_NEXT;
        if (end - at < 8)
            return V6_BAD_EXT;
        Py_ssize_t size;
        if (p == 44) {
            size = 8;
            *checked = 0;
        } else if (p == 51) {
            size = ((Py_ssize_t)d[at + 1] + 2) * 4;
        } else {
            size = ((Py_ssize_t)d[at + 1] + 1) * 8;
            if (p == 43)
                *checked = 0;
        }
        if (size > end - at)
            return V6_BAD_EXT;
        p = d[at];
        at += size;
    }
    return V6_EXT_TOO_LONG;
}

/* encap.ipv6.l4_checksum_reason6, with encap.gso.checksum_reason */
static int l4_check6(uint8_t *d, Py_ssize_t start, int protocol, Py_ssize_t l4, Py_ssize_t end)
{
    Py_ssize_t length = end - l4, field;
    if (protocol == 6) {
        if (length < 20 || d[l4 + 12] >> 4 < 5 || (d[l4 + 12] >> 4) * 4 > length)
            return V6_BAD_L4_HDR;
        field = l4 + 16;
    } else if (protocol == 17) {
        if (length < 8 || (Py_ssize_t)be16(d + l4 + 4) != length)
            return V6_BAD_L4_HDR;
        field = l4 + 6;
        if (!d[field] && !d[field + 1])
            return V6_BAD_L4_CSUM;
    } else {
        if (length < 4)
            return V6_BAD_L4_HDR;
        field = l4 + 2;
    }
    uint32_t pseudo = (sum16(d + start + 8, 32) + (uint32_t)protocol + (uint32_t)(length % 0xFFFF))
                    % 0xFFFF;
    uint32_t body = sum16(d + l4, length);
    if ((pseudo + body) % 0xFFFF == 0)
        return V6_OK;
    if ((be16(d + field) + 0xFFFF - pseudo) % 0xFFFF)
        return V6_BAD_L4_CSUM;
    uint32_t c = ~fold(body) & 0xFFFF; /* the field's pseudo-header sum is in body */
    if (c == 0 && protocol == 17)
        c = 0xFFFF;
    put16(d + field, c);
    return V6_OK;
}

/* encap.ipv6.drop_reason6 */
static int check_inner6(uint8_t *d, Py_ssize_t start, Py_ssize_t end, const rules6_t *rules)
{
    Py_ssize_t length = end - start;
    if (length < 40)
        return V6_TRUNCATED;
    if (d[start] >> 4 != 6)
        return V6_BAD_VERSION;
    Py_ssize_t payload = be16(d + start + 4);
    if (payload == 0 && d[start + 6] == 0)
        return V6_JUMBO;
    if (payload + 40 != length)
        return V6_BAD_LENGTH;
    Py_ssize_t i;
    for (i = 0; i < rules->nsources; i++)
        if (inside6(d + start + 8, &rules->sources[i]))
            break;
    if (i == rules->nsources)
        return V6_FOREIGN;
    if (!inside6(d + start + 24, &rules->destination))
        return V6_NOT_OURS;
    int protocol, checked;
    Py_ssize_t l4;
    int r = walk6(d, start, end, &protocol, &l4, &checked);
    if (r != V6_OK)
        return r;
    if (protocol == 0 || protocol == 255)
        return V6_BAD_NEXT;
    if (!checked || (protocol != 6 && protocol != 17 && protocol != 58))
        return V6_OK;
    return l4_check6(d, start, protocol, l4, end);
}

/* encap.ipv6.vxlan_reason6 */
static int check_vxlan6(const uint8_t *d, Py_ssize_t at, Py_ssize_t end, const rules6_t *rules)
{
    if (end - at < VXLAN_HEADROOM)
        return V6_VX_TRUNC;
    if (!(d[at] & 0x08))
        return V6_VX_FLAGS;
    if (memcmp(d + at + 4, rules->vni, 3) != 0)
        return V6_VX_VNI;
    if (d[at + 20] != 0x86 || d[at + 21] != 0xDD)
        return V6_VX_ETHER;
    if (memcmp(d + at + 8, rules->mac, 6) != 0)
        return memcmp(d + at + 8, rules->solicited, 6) == 0 ? V6_NDP : V6_VX_MAC;
    Py_ssize_t inner = at + VXLAN_HEADROOM;
    if (end - inner >= 40 + 24 && d[inner + 6] == 58 && d[inner + 7] == 255 && d[inner + 40] == 135)
        return V6_NDP;
    return V6_OK;
}

static int parse_rules6(rules6_t *rules, subnet6_t *storage, PyObject *sources,
                        PyObject *destination, PyObject *vxlan)
{
    rules->sources = storage;
    rules->nsources = 0;
    if (!parse_subnet6(destination, &rules->destination))
        return 0;
    Py_buffer vni, mac, solicited;
    if (!PyArg_ParseTuple(vxlan, "y*y*y*", &vni, &mac, &solicited))
        return 0;
    int ok = vni.len == 3 && mac.len == 6 && solicited.len == 6;
    if (ok) {
        memcpy(rules->vni, vni.buf, 3);
        memcpy(rules->mac, mac.buf, 6);
        memcpy(rules->solicited, solicited.buf, 6);
    }
    PyBuffer_Release(&vni);
    PyBuffer_Release(&mac);
    PyBuffer_Release(&solicited);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "vxlan is (3 VNI bytes, 6-byte MAC, 6-byte MAC)");
        return 0;
    }
    /* our own tuple: parsing a subnet may run Python that changes a list of them */
    PyObject *seq = PySequence_Tuple(sources);
    if (seq == NULL)
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n > 8) {
        rules->sources = PyMem_Malloc(sizeof(subnet6_t) * (size_t)n);
        if (rules->sources == NULL) {
            rules->sources = storage;
            Py_DECREF(seq);
            PyErr_NoMemory();
            return 0;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!parse_subnet6(PyTuple_GET_ITEM(seq, i), &rules->sources[i])) {
            Py_DECREF(seq);
            return 0;
        }
    }
    rules->nsources = n;
    Py_DECREF(seq);
    return 1;
}

static PyObject *append_pair(PyObject *list, Py_ssize_t a, Py_ssize_t b)
{
    PyObject *item = b < 0 ? PyLong_FromSsize_t(a) : Py_BuildValue("(nn)", a, b);
    if (item == NULL || PyList_Append(list, item) < 0) {
        Py_XDECREF(item);
        return NULL;
    }
    Py_DECREF(item);
    return list;
}

static PyObject *valid_pieces6(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t size, segment;
    PyObject *sources, *destination, *drops, *vxlan, *ndp;
    if (!PyArg_ParseTuple(args, "w*nnOOOOO!", &data, &size, &segment, &sources, &destination,
                          &drops, &vxlan, &PyList_Type, &ndp))
        return NULL;
    subnet6_t storage[8];
    rules6_t rules;
    PyObject *pieces = NULL;
    Py_ssize_t counts[V6_COUNT] = {0};
    if (!parse_rules6(&rules, storage, sources, destination, vxlan))
        goto done;
    if (size > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "a GRO receive is at most 65535 bytes, not %zd", size);
        goto done;
    }
    if (size > data.len) {
        PyErr_Format(PyExc_ValueError, "size %zd is beyond the buffer (%zd bytes)", size,
                     data.len);
        goto done;
    }
    pieces = PyList_New(0);
    if (pieces == NULL)
        goto done;
    if (size <= 0 || segment <= 0) {
        counts[V6_VX_TRUNC] = 1; /* an empty datagram */
    } else {
        uint8_t *d = data.buf;
        for (Py_ssize_t base = 0; base < size; base += segment) {
            Py_ssize_t end = segment < size - base ? base + segment : size;
            int r = check_vxlan6(d, base, end, &rules);
            if (r == V6_NDP) {
                if (append_pair(ndp, base, -1) == NULL)
                    goto fail;
                continue;
            }
            if (r == V6_OK)
                r = check_inner6(d, base + VXLAN_HEADROOM, end, &rules);
            if (r == V6_OK) {
                if (append_pair(pieces, base + VXLAN_HEADROOM, end) == NULL)
                    goto fail;
            } else {
                counts[r]++;
            }
        }
    }
    if (add_counts(drops, v6_reason_strings, counts, V6_COUNT))
        goto done;
fail:
    Py_CLEAR(pieces);
done:
    if (rules.sources != storage)
        PyMem_Free(rules.sources);
    PyBuffer_Release(&data);
    return pieces;
}

/* -- plan_tun_writes6 -------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t start, end;
} piece6_t;

/* The (start, end) pieces into an array of our own (*out, PyMem_Free it), each checked as
 * the reference checks it: inside a buffer of size bytes, at least an IPv6 header. */
static int parse_pieces(PyObject *arg, Py_ssize_t size, piece6_t **out, Py_ssize_t *n)
{
    PyObject *seq = PySequence_Tuple(arg); /* ours: reading a piece may run Python */
    if (seq == NULL)
        return 0;
    *n = PyTuple_GET_SIZE(seq);
    *out = PyMem_Malloc(sizeof(piece6_t) * (size_t)(*n ? *n : 1));
    if (*out == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return 0;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *item = PySequence_Tuple(PyTuple_GET_ITEM(seq, i));
        Py_ssize_t start, end;
        int ok = item != NULL && PyArg_ParseTuple(item, "nn", &start, &end);
        Py_XDECREF(item);
        if (!ok) {
            Py_DECREF(seq);
            return 0;
        }
        /* 0 <= start <= end - 40, end <= size, without overflow */
        if (!(start >= 0 && end <= size && end >= 40 && start <= end - 40)) {
            PyErr_Format(PyExc_ValueError, "piece %zd:%zd outside the buffer or too short",
                         start, end);
            Py_DECREF(seq);
            return 0;
        }
        (*out)[i] = (piece6_t){start, end};
    }
    Py_DECREF(seq);
    return 1;
}

static const uint8_t vnet_plain6[10] = {0};

/* Where plan6 puts its writes: a plain packet d[start:end] (with a zero virtio_net_hdr),
 * or a super-packet: its virtio_net_hdr, its header (hl bytes) and the payloads of run,
 * size bytes of packets in all. plan_tun_writes6 makes Python lists of them, Drains.rx6
 * writes them into the TUN (drains_ipv6.c). 0 on error. */
typedef struct sink6 sink6_t;
struct sink6 {
    int (*plain)(sink6_t *, const uint8_t *d, Py_ssize_t start, Py_ssize_t end);
    int (*super)(sink6_t *, const uint8_t vnet[10], const uint8_t *header, Py_ssize_t hl,
                 const uint8_t *d, const piece6_t *run, Py_ssize_t count, Py_ssize_t size);
};

/* encap.ipv6.tcp6_super_header and the write around it: the header of the packet at
 * d[head:] for a super-packet of total bytes, then the payloads d[run[i].start + hl:
 * run[i].end] (the first one's from skip on: its header is the super-packet's). */
static int super_write6(sink6_t *sink, const uint8_t *d, Py_ssize_t head, Py_ssize_t hl,
                        Py_ssize_t total, int psh, Py_ssize_t segment, const piece6_t *run,
                        Py_ssize_t count, Py_ssize_t size)
{
    uint8_t header[100], vnet[10];
    memcpy(header, d + head, (size_t)hl);
    uint32_t upper = (uint32_t)(total - 40);
    put16(header + 4, upper);
    if (psh)
        header[40 + 13] |= PSH;
    put16(header + 40 + 16, (sum16(header + 8, 32) + 6 + upper % 0xFFFF) % 0xFFFF);
    uint32_t fields[4] = {(uint32_t)hl, (uint32_t)segment, 40, 16};
    vnet[0] = 1; /* NEEDS_CSUM */
    vnet[1] = 4; /* GSO_TCPV6 */
    for (int i = 0; i < 4; i++) { /* little-endian, as the reference packs them */
        vnet[2 + 2 * i] = (uint8_t)fields[i];
        vnet[3 + 2 * i] = (uint8_t)(fields[i] >> 8);
    }
    return sink->super(sink, vnet, header, hl, d, run, count, size);
}

/* encap.ipv6._run_key equal for the packets at a and b (headers hl bytes long) */
static inline int same_flow6(const uint8_t *d, Py_ssize_t a, Py_ssize_t b, Py_ssize_t hl)
{
    return memcmp(d + a, d + b, 4) == 0 && memcmp(d + a + 6, d + b + 6, 38) == 0
        && memcmp(d + a + 48, d + b + 48, 5) == 0 && memcmp(d + a + 54, d + b + 54, 2) == 0
        && memcmp(d + a + 58, d + b + 58, (size_t)(hl - 58)) == 0;
}

/* encap.ipv6.plan_tun_writes6's rules over checked pieces (each inside d, 40 bytes or
 * more), every write to sink in order. 0 on error. */
static int plan6(const uint8_t *d, const piece6_t *pieces, Py_ssize_t n, Py_ssize_t mtu,
                 sink6_t *sink)
{
    piece6_t run[MAX_RUN];
    Py_ssize_t count = 0, hl = 0, run_length = 0, total = 0;
    uint32_t expect = 0;
#define CLOSE6(psh_)                                                                         \
    do {                                                                                     \
        int ok_ = count == 1                                                                 \
                    ? sink->plain(sink, d, run[0].start, run[0].end)                         \
                    : super_write6(sink, d, run[0].start, hl, total, (psh_),                 \
                                   run_length - hl, run, count, total + (count - 1) * hl);   \
        count = 0;                                                                           \
        if (!ok_)                                                                            \
            return 0;                                                                        \
    } while (0)
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t start = pieces[i].start, end = pieces[i].end, length = end - start;
        int tcp = d[start + 6] == 6 && length >= 60 && length <= 40 + 0xFFFF;
        Py_ssize_t offset = tcp ? 40 + (d[start + 40 + 12] >> 4) * 4 : 0;
        tcp = tcp && offset >= 60 && offset <= length;
        uint8_t flags = tcp ? d[start + 40 + 13] : 0;
        if (count) {
            uint32_t seq = tcp ? be32(d + start + 44) : 0;
            if (tcp && offset == hl && length > hl && length <= run_length && seq == expect
                && total + length - hl <= 40 + 0xFFFF && (flags == ACK || flags == (ACK | PSH))
                && same_flow6(d, start, run[0].start, hl)) {
                run[count++] = pieces[i];
                total += length - hl;
                expect = seq + (uint32_t)(length - hl);
                int psh = flags != ACK;
                if (psh || length < run_length || count == MAX_RUN)
                    CLOSE6(psh);
                continue;
            }
            CLOSE6(0);
        }
        if (tcp && mtu && length > mtu && mtu > offset) {
            piece6_t whole = {start, end};
            if (!super_write6(sink, d, start, offset, length, 0, mtu - offset, &whole, 1, length))
                return 0;
            continue;
        }
        if (tcp && flags == ACK && length > offset) {
            run[0] = pieces[i];
            count = 1;
            hl = offset;
            run_length = total = length;
            expect = be32(d + start + 44) + (uint32_t)(length - offset);
            continue;
        }
        if (!sink->plain(sink, d, start, end))
            return 0;
    }
    if (count)
        CLOSE6(0);
#undef CLOSE6
    return 1;
}

/* The sink of plan_tun_writes6: ([buffers...], packets, size) appended to a list */
typedef struct {
    sink6_t sink;
    PyObject *writes;
} list_sink6_t;

/* ([buffers...], packets, size) appended to writes; steals buffers. */
static int add_write6(PyObject *writes, PyObject *buffers, Py_ssize_t packets, Py_ssize_t size)
{
    PyObject *item = buffers ? Py_BuildValue("(Onn)", buffers, packets, size) : NULL;
    Py_XDECREF(buffers);
    if (item == NULL || PyList_Append(writes, item) < 0) {
        Py_XDECREF(item);
        return 0;
    }
    Py_DECREF(item);
    return 1;
}

static int list_plain6(sink6_t *sink, const uint8_t *d, Py_ssize_t start, Py_ssize_t end)
{
    PyObject *buffers = Py_BuildValue("[y#y#]", vnet_plain6, (Py_ssize_t)10, d + start, end - start);
    return add_write6(((list_sink6_t *)sink)->writes, buffers, 1, end - start);
}

static int list_super6(sink6_t *sink, const uint8_t vnet[10], const uint8_t *header,
                       Py_ssize_t hl, const uint8_t *d, const piece6_t *run, Py_ssize_t count,
                       Py_ssize_t size)
{
    PyObject *buffers = PyList_New(2 + count);
    if (buffers == NULL)
        return 0;
    PyObject *parts[2] = {PyBytes_FromStringAndSize((const char *)vnet, 10),
                          PyBytes_FromStringAndSize((const char *)header, hl)};
    for (int i = 0; i < 2; i++) {
        if (parts[i] == NULL) {
            Py_XDECREF(parts[1 - i]);
            Py_DECREF(buffers);
            return 0;
        }
        PyList_SET_ITEM(buffers, i, parts[i]);
        parts[i] = NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *payload = PyBytes_FromStringAndSize((const char *)d + run[i].start + hl,
                                                      run[i].end - run[i].start - hl);
        if (payload == NULL) {
            Py_DECREF(buffers);
            return 0;
        }
        PyList_SET_ITEM(buffers, 2 + i, payload);
    }
    return add_write6(((list_sink6_t *)sink)->writes, buffers, count, size);
}

static PyObject *plan_tun_writes6(PyObject *self, PyObject *args)
{
    Py_buffer data;
    PyObject *pieces_arg;
    Py_ssize_t mtu;
    if (!PyArg_ParseTuple(args, "w*On", &data, &pieces_arg, &mtu))
        return NULL;
    list_sink6_t sink = {{list_plain6, list_super6}, NULL};
    piece6_t *pieces = NULL;
    Py_ssize_t n = 0;
    if (parse_pieces(pieces_arg, data.len, &pieces, &n)
        && (sink.writes = PyList_New(0)) != NULL
        && !plan6(data.buf, pieces, n, mtu, &sink.sink))
        Py_CLEAR(sink.writes);
    PyMem_Free(pieces);
    PyBuffer_Release(&data);
    return sink.writes;
}
