/* encap._native: Drains.tx, TUN -> peer: one call per wake-up of the TUN's reader.
 * Reference: overlay/dataplane/send.py, SendPath.on_tun_readable and what it calls:
 *
 *   tx_read (stage 1)              _read_tun: drain the TUN into the arena, route
 *     tun_readv, tx_route,           (route, lookup_route: PeerTable.lookup; _no_route),
 *     tx_too_big, tx_offload         answer DF packets beyond the MTU (_too_big), cut
 *                                    super-packets, note partial checksums (tso.c)
 *   tx_send_groups (stage 2, GSO)  _send_groups: one UDP_SEGMENT sendmsg per group of
 *     next_group, send_gso           encap.gso.plan_groups
 *   tx_send_each (stage 2)         _send_each: one sendto per packet
 *   tx_sent                        _sent: the batch histogram, the peer's counts
 *   tx_wake, drains_tx             on_tun_readable
 *
 * tests/overlay/dataplane/test_fastpath.py and tests/encap/test_native.py compare it with
 * the reference on real sockets: every byte sent and every count.
 */

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

/* A peer's (str, int) address as a sockaddr of family: AF_INET into a sockaddr_in
 * (PeerTable builds them from IPv4Address), AF_INET6 into a sockaddr_in6 (from the lease's
 * PublicIPv6). */
static int parse_addr(PyObject *addr, int family, void *sa)
{
    const char *ip;
    int port;
    const char *name = family == AF_INET6 ? "IPv6" : "IPv4";
    if (!PyTuple_Check(addr) || !PyArg_ParseTuple(addr, "si", &ip, &port)) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "a peer's addr is an (%s address, port) tuple", name);
        return 0;
    }
    struct sockaddr_in *sa4 = sa;
    struct sockaddr_in6 *sa6 = sa;
    if (family == AF_INET6)
        memset(sa6, 0, sizeof *sa6);
    else
        memset(sa4, 0, sizeof *sa4);
    void *raw = family == AF_INET6 ? (void *)&sa6->sin6_addr : (void *)&sa4->sin_addr;
    if (port < 0 || port > 0xFFFF || inet_pton(family, ip, raw) != 1) {
        PyErr_Format(PyExc_ValueError, "not an %s address and port: %R", name, addr);
        return 0;
    }
    if (family == AF_INET6) {
        sa6->sin6_family = AF_INET6;
        sa6->sin6_port = htons((uint16_t)port);
    } else {
        sa4->sin_family = AF_INET;
        sa4->sin_port = htons((uint16_t)port);
    }
    return 1;
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
    int fast6, gso6, gso6_off; /* the IPv6 half's packets done in C (drains_ipv6.c); its
                                  gso, and whether an EIO turned it off */
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

/* An item of a route list, (shift, dict): its shift, within 0..max_shift; -1 with an
 * exception set when it is not such a pair. list names the list in the error. */
static long route_shift(PyObject *item, const char *list, long max_shift)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
        || !PyDict_Check(PyTuple_GET_ITEM(item, 1))) {
        PyErr_Format(PyExc_TypeError, "peers.%s is a list of (shift, dict)", list);
        return -1;
    }
    long shift = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
    if (shift == -1 && PyErr_Occurred())
        return -1;
    if (shift < 0 || shift > max_shift) {
        PyErr_Format(PyExc_ValueError, "a shift in peers.%s is 0..%ld", list, max_shift);
        return -1;
    }
    return shift;
}

/* The peer at key in a route item's dict (new reference), or NULL: with an exception set
 * on error, without one when key is not there. Takes key's reference (NULL: an error). */
static PyObject *route_peer(PyObject *item, PyObject *key)
{
    if (key == NULL)
        return NULL;
    PyObject *peer = PyDict_GetItemWithError(PyTuple_GET_ITEM(item, 1), key);
    Py_XINCREF(peer);
    Py_DECREF(key);
    return peer;
}

/* PeerTable.lookup over peers.routes: the Peer holding dst (new reference), Py_None when
 * none does, NULL on error. */
static PyObject *route(PyObject *routes, uint32_t dst)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(routes); i++) {
        /* owned: a key's __eq__ (a hostile table) may empty the list */
        PyObject *item = Py_NewRef(PyList_GET_ITEM(routes, i));
        long shift = route_shift(item, "routes", 32);
        PyObject *peer = shift < 0 ? NULL
                       : route_peer(item, PyLong_FromUnsignedLong(
                                              (unsigned long)((uint64_t)dst >> shift)));
        Py_DECREF(item);
        if (peer != NULL)
            return peer;
        if (PyErr_Occurred())
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
    if (!parse_addr(addr, AF_INET, &d->route_sa))
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

/* One read from the TUN: its virtio_net_hdr into hdr (when the TUN has one), the packet
 * into packet[0:room]. readv's result, EINTR retried. */
static inline ssize_t tun_readv(const drains_t *d, uint8_t *hdr, uint8_t *packet,
                                Py_ssize_t room)
{
    struct iovec iov[2];
    int k = 0;
    if (d->vnet)
        iov[k++] = (struct iovec){hdr, 10};
    iov[k++] = (struct iovec){packet, (size_t)room};
    ssize_t got;
    do
        got = readv(d->tun_fd, iov, k);
    while (got < 0 && errno == EINTR);
    return got;
}

/* A rare event: the dataplane's method attr[method] runs on a copy of the packet at
 * packet[0:length] (it counts the drop and may answer with an ICMP error). 0 when it
 * ran, -1 on error. */
static int tell_dataplane(drains_t *d, int method, const uint8_t *packet, Py_ssize_t length)
{
    PyObject *copy = PyBytes_FromStringAndSize((const char *)packet, length);
    PyObject *r = copy ? PyObject_CallMethodOneArg(d->dp, attr[method], copy) : NULL;
    Py_XDECREF(copy);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* An IPv6 packet read from the TUN (rare on an IPv4 datapath; vxlan's IPv6 half with
 * EnableIPv6): the dataplane's _send_ipv6 runs on a copy of its virtio_net_hdr (zeros
 * when the TUN has none) followed by the packet at packet[0:length]. 0 when it ran, -1
 * on error. */
static int tell_ipv6(drains_t *d, const uint8_t hdr[10], const uint8_t *packet,
                     Py_ssize_t length)
{
    PyObject *frame = PyBytes_FromStringAndSize(NULL, 10 + length);
    if (frame == NULL)
        return -1;
    memcpy(PyBytes_AS_STRING(frame), hdr, 10);
    memcpy(PyBytes_AS_STRING(frame) + 10, packet, (size_t)length);
    PyObject *r = PyObject_CallMethodOneArg(d->dp, attr[A_SEND_IPV6], frame);
    Py_DECREF(frame);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The wake-up's peer for the packet read at packet[0:length], in *peer: its destination
 * looked up when it is not the last packet's (last_dst, when *have_dst). 1: routed; 0: no
 * route (dataplane._no_route ran: it counts the drop and may answer with an ICMP error);
 * -1 on error. */
static inline int tx_route(drains_t *d, tx_t *t, const uint8_t *packet, Py_ssize_t length,
                           uint8_t last_dst[4], int *have_dst, Py_ssize_t *peer)
{
    if (*have_dst && memcmp(packet + 16, last_dst, 4) == 0)
        return 1;
    if (!lookup_route(d, be32(packet + 16)))
        return -1;
    if (!d->route_found) {
        *have_dst = 0;
        return tell_dataplane(d, A_NO_ROUTE, packet, length);
    }
    if ((*peer = tx_peer(t, &d->route_sa, d->route_stats)) < 0)
        return -1;
    memcpy(last_dst, packet + 16, 4);
    *have_dst = 1;
    return 1;
}

/* The packet at packet[0:length] is longer than the TUN's MTU (it was queued before the
 * MTU was lowered): with DF it cannot go, and dataplane._too_big runs (it counts the drop
 * and answers with ICMP frag-needed); without DF it goes as it is, the kernel fragmenting
 * its datagram. 1: it goes; 0: dropped; -1 on error. */
static int tx_too_big(drains_t *d, const uint8_t *packet, Py_ssize_t length)
{
    if (!(packet[6] & 0x40)) /* DF */
        return 1;
    return tell_dataplane(d, A_TOO_BIG, packet, length);
}

/* The offloads the virtio_net_hdr of the packet read at arena[*at + headroom:][:length]
 * asks for: a TCP super-packet is cut in place into segments behind the prefix
 * (encap.tso.segment_tcp4), each kept, *at moved past them, unless they are longer than
 * the MTU (tx_too_big); a partial checksum's region is noted in regions (finished after
 * the drain). What cannot be done is counted. 1: keep the packet as read; 0: done with it
 * (cut, or dropped); -1 on error. */
static inline int tx_offload(drains_t *d, tx_t *t, const uint8_t hdr[10], Py_ssize_t *at,
                             Py_ssize_t length, Py_ssize_t peer, const uint8_t *prefix,
                             Py_ssize_t (*regions)[3], Py_ssize_t *nregions)
{
    uint16_t gso_size, csum_start, csum_offset;
    memcpy(&gso_size, hdr + 4, 2);
    memcpy(&csum_start, hdr + 6, 2);
    memcpy(&csum_offset, hdr + 8, 2);
    if (hdr[1] == VNET_GSO_TCPV4) {
        char detail[96];
        Py_ssize_t out[3];
        const char *reason = cut_tcp4(d->arena.buf, d->arena.len, *at, length, gso_size,
                                      prefix, d->headroom, out, detail, sizeof detail);
        if (reason != NULL) {
            t->drops[tx_reason(reason)]++;
            return 0;
        }
        Py_ssize_t first = (out[0] > 1 ? out[1] : out[2]) - d->headroom;
        if (first > d->tx_limit) { /* cut at a larger MTU */
            int goes = tx_too_big(d, d->arena.buf + *at + d->headroom, first);
            if (goes <= 0)
                return goes;
        }
        for (Py_ssize_t i = 0; i < out[0]; i++)
            if (!keep(t, i < out[0] - 1 ? out[1] : out[2], peer))
                return -1;
        *at += (out[0] - 1) * out[1] + out[2];
        d->counts[C_TX_TUN_SUPER]++;
        return 0;
    }
    if (hdr[1] != VNET_GSO_NONE) {
        t->drops[T_GSO_UNSUPPORTED]++;
        return 0;
    }
    if (!partial_region(*at + d->headroom, length, csum_start, csum_offset,
                        regions[*nregions])) {
        t->drops[T_BAD_CSUM_OFFSETS]++;
        return 0;
    }
    (*nregions)++;
    return 1;
}

/* vxlan's IPv6 half: drains_ipv6.c, included after this file */
static int tx6(drains_t *d, const uint8_t hdr[10], Py_ssize_t at, Py_ssize_t length, int *gso);
static int tx6_begin(drains_t *d, int *gso);
static int tx6_flush(drains_t *d, int *gso);
static int drops6_now(drains_t *d);

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
    if (regions == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    for (Py_ssize_t n = 0; n < budget; n++) {
        if (at > limit)
            break;
        Py_ssize_t body = at + headroom;
        uint8_t hdr[10] = {0};
        ssize_t got = tun_readv(d, hdr, b + body, size - body);
        if (got < 0) {
            if (would_block(errno))
                break;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        Py_ssize_t length = got - (d->vnet ? 10 : 0);
        if (length < 20 || b[body] >> 4 != 4) {
            if (length >= 40 && b[body] >> 4 == 6) { /* IPv6: its half, else _send_ipv6 */
                int done6 = t->fast6 ? tx6(d, hdr, at, length, &t->gso6) : 0;
                if (done6 < 0)
                    goto done;
                if (done6 > 0)
                    continue;
                if (tell_ipv6(d, hdr, b + body, length) < 0)
                    goto done;
                have_dst = 0; /* Python ran: route afresh */
                continue;
            }
            t->drops[T_NOT_IPV4]++;
            continue;
        }
        int routed = tx_route(d, t, b + body, length, last_dst, &have_dst, &peer);
        if (routed <= 0) {
            if (routed < 0)
                goto done;
            continue;
        }
        if (length > d->tx_limit && !(d->tso && hdr[1])) {
            int goes = tx_too_big(d, b + body, length);
            if (goes <= 0) {
                if (goes < 0)
                    goto done;
                continue;
            }
        }
        /* the prefix the packet was routed with: _no_route (and _too_big) may have changed
         * the tables */
        const uint8_t *prefix = (const uint8_t *)PyBytes_AS_STRING(d->route_prefix);
        if (d->tso && (hdr[1] || hdr[0] & VNET_NEEDS_CSUM)) {
            int as_read = tx_offload(d, t, hdr, &at, length, peer, prefix, regions, &nregions);
            if (as_read <= 0) {
                if (as_read < 0)
                    goto done;
                continue;
            }
        }
        if (headroom)
            memcpy(b + at, prefix, (size_t)headroom);
        if (!keep(t, headroom + length, peer))
            goto done;
        at = body + length;
    }
    ok = 1;
done:
    finish_regions(b, regions, nregions); /* encap.tso.finish_checksums */
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

/* The GSO group of the packets from start on (encap.gso.plan_groups' rule: one peer,
 * every length the first's but the last, which may be shorter, at most MAX_RUN packets
 * and MAX_GSO_BYTES): its end, *total its bytes. */
static inline Py_ssize_t next_group(const tx_t *t, Py_ssize_t start, Py_ssize_t *total)
{
    const tx_packet_t *p = t->packets;
    Py_ssize_t n = t->npackets, size = p[start].length, previous = size, end;
    *total = size;
    for (end = start + 1; end < n; end++) {
        Py_ssize_t length = p[end].length;
        if (!(previous == size && length <= size && p[end].peer == p[start].peer
              && *total + length <= MAX_GSO_BYTES && end - start < MAX_RUN))
            break;
        *total += length;
        previous = length;
    }
    return end;
}

/* One sendmsg of data[0:total] to sa with UDP_SEGMENT size (encap.gso.segment_cmsg): the
 * kernel cuts it into datagrams of size bytes, the last shorter. sendmsg's result, EINTR
 * retried. */
static inline ssize_t send_gso(int fd, const struct sockaddr *sa, socklen_t sa_length,
                               const uint8_t *data, Py_ssize_t total, Py_ssize_t size)
{
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {(void *)data, (size_t)total};
    struct msghdr msg = {
        .msg_name = (void *)sa,
        .msg_namelen = sa_length,
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
        r = sendmsg(fd, &msg, 0);
    while (r < 0 && errno == EINTR);
    return r;
}

/* Stage 2 (GSO), UdpDataplane._send_groups with encap.gso.plan_groups' grouping: one
 * sendmsg per group, the kernel cutting it into one datagram per packet. */
static int tx_send_groups(drains_t *d, tx_t *t, double now)
{
    Py_ssize_t at = 0, n = t->npackets;
    tx_packet_t *p = t->packets;
    const uint8_t *b = d->arena.buf;
    for (Py_ssize_t start = 0, end; start < n; start = end) {
        Py_ssize_t total;
        end = next_group(t, start, &total);
        Py_ssize_t first = at;
        at += total;
        if (end - start == 1) {
            if (!tx_send_each(d, t, start, end, first, now))
                return 0;
            continue;
        }
        const tx_peer_t *peer = &t->peers[p[start].peer];
        ssize_t r = send_gso(d->sock_fd, (const struct sockaddr *)&peer->sa, sizeof peer->sa,
                             b + first, total, p[start].length);
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
    int one_by_one = d->v6.path != NULL ? tx6_begin(d, &t->gso6) : 1;
    if (one_by_one < 0)
        return NULL;
    t->fast6 = !one_by_one;
    int gso6 = t->gso6;
    int ok = tx_read(d, t);
    if (t->fast6 && ok) /* the IPv6 half's open group (Ipv6Path.flush_tx) */
        ok = tx6_flush(d, &t->gso6);
    else if (t->fast6)
        forget_group6(&d->v6);
    t->gso6_off = t->fast6 && gso6 && !t->gso6;
    if (ok && t->npackets) {
        double now = monotonic();
        /* one packet (a ping, an ACK at low rate): a sendto, without planning groups */
        ok = gso && t->npackets > 1 ? tx_send_groups(d, t, now)
                                    : tx_send_each(d, t, 0, t->npackets, 0, now);
    }
    /* what was counted is added even when an exception ends the wake-up */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    int finished = (!t->gso6_off || set(d->v6.path, A_GSO, Py_False))
                && drops6_now(d) && (!t->gso_off || set(d->dp, A_GSO, Py_False))
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

/* UdpDataplane.on_tun_readable */
static PyObject *drains_tx(drains_t *d, PyObject *unused)
{
    return wake(d, A_ON_TUN_READABLE, tx_wake);
}
