/* encap._native: vxlan's IPv6 half in the drains (EnableIPv6). Reference:
 * overlay/dataplane/ipv6.py, Ipv6Path, and what it calls:
 *
 *   tx6 (from Drains.tx's read loop)  Ipv6Path.send: an IPv6 packet read from the TUN,
 *     tx6_join, tx6_flush, tx6_super,  routed (lookup_route6: PeerTable.lookup6), its
 *     tx6_group, tx6_sent              partial checksum finished, into the open group
 *                                      of small packets (_join; sent at its end:
 *                                      flush_tx); a TSO6 super-packet cut in place
 *                                      (tso.c) and sent with UDP_SEGMENT (_send_super,
 *                                      _send_group, _sent)
 *   Drains.rx6: rx6_loop, rx6_run,     Ipv6Path.on_socket_readable (_receive_gro,
 *     rx6_write (plan6 of ipv6.c)      _receive_run, _write): receive, validate
 *                                      (valid_pieces6's rules), write to the TUN
 *
 * What is rare goes to the reference's Python, as on the IPv4 path: an IPv6 packet
 * without a route, one beyond the MTU, a super-packet the cut refuses (_send_ipv6, which
 * counts it and answers with an ICMPv6 error), a possible neighbour solicitation
 * (_native_ndp, which answers it). A trace or an impairment attached (the path's
 * _one_by_one), or no UDP GRO on its socket: the whole IPv6 work goes to the reference.
 * Counts are kept as Drains.tx and rx keep theirs (flush); the IPv6 half's drops are
 * added to counters.drops and counters.drops6 at the end of each wake-up.
 *
 * tests/overlay/dataplane/test_ipv6_drains.py compares it with the reference on real
 * sockets: every byte sent and written, every count.
 */

#define TX_ARENA6 (3 * MAX_DATAGRAM) /* overlay.dataplane.ipv6.TX_ARENA6 */

/* The IPv6 half's drops now, into both tables (the drop log watches for new reasons) */
static int drops6_now(drains_t *d)
{
    half6_t *h = &d->v6;
    for (int r = 1; r < D6_COUNT; r++) {
        if (!h->drops[r])
            continue;
        PyObject *all = get(d->counters, A_DROPS);
        PyObject *six = all ? get(d->counters, A_DROPS6) : NULL;
        int ok = six != NULL && add_counts(all, d6_reason_strings, h->drops, D6_COUNT)
              && add_counts(six, d6_reason_strings, h->drops, D6_COUNT);
        Py_XDECREF(all);
        Py_XDECREF(six);
        memset(h->drops, 0, sizeof h->drops);
        return ok;
    }
    return 1;
}

/* -- TX --------------------------------------------------------------------------------- */

/* int(address) >> shift as a Python int, for the 128-bit address hi:lo (new reference,
 * NULL on error). */
static PyObject *shifted_key6(uint64_t hi, uint64_t lo, long shift)
{
    uint64_t top = shift >= 64 ? 0 : shift ? hi >> shift : hi;
    uint64_t low = shift >= 128 ? 0
                 : shift >= 64  ? hi >> (shift - 64)
                 : shift        ? hi << (64 - shift) | lo >> shift
                                : lo;
    if (top == 0)
        return PyLong_FromUnsignedLongLong(low);
    PyObject *t = PyLong_FromUnsignedLongLong(top), *l = PyLong_FromUnsignedLongLong(low);
    PyObject *s64 = PyLong_FromLong(64), *up = t && s64 ? PyNumber_Lshift(t, s64) : NULL;
    PyObject *key = up && l ? PyNumber_Or(up, l) : NULL;
    Py_XDECREF(t);
    Py_XDECREF(l);
    Py_XDECREF(s64);
    Py_XDECREF(up);
    return key;
}

/* PeerTable.lookup6 over peers.routes6: the Peer whose subnet holds the 16-byte dst (new
 * reference), Py_None when none does, NULL on error. A key is int(dst) >> shift. */
static PyObject *route6(PyObject *routes6, const uint8_t *dst)
{
    uint64_t hi = be64(dst), lo = be64(dst + 8);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(routes6); i++) {
        PyObject *item = Py_NewRef(PyList_GET_ITEM(routes6, i));
        long shift = route_shift(item, "routes6", 128);
        PyObject *peer = shift < 0 ? NULL : route_peer(item, shifted_key6(hi, lo, shift));
        Py_DECREF(item);
        if (peer != NULL)
            return peer;
        if (PyErr_Occurred())
            return NULL;
    }
    return Py_NewRef(Py_None);
}

/* h->route_* for dst: kept from the last lookup, or looked up. 1: a peer with a prefix of
 * the vxlan headroom; 0: none (no peer, or no VTEP MAC); -1 on error. */
static int lookup_route6(drains_t *d, const uint8_t *dst)
{
    half6_t *h = &d->v6;
    if (h->route_prefix != NULL && memcmp(h->route_dst, dst, 16) == 0)
        return h->route_found;
    Py_CLEAR(h->route_prefix);
    Py_CLEAR(h->route_stats);
    h->route_found = 0;
    PyObject *found = route6(h->routes6, dst);
    if (found == NULL)
        return -1;
    memcpy(h->route_dst, dst, 16);
    if (found == Py_None) {
        h->route_prefix = found; /* a lookup kept: no route */
        return 0;
    }
    PyObject *prefix = get(found, A_PREFIX);
    PyObject *addr = prefix ? get(found, A_ADDR) : NULL;
    PyObject *stats = addr ? get(found, A_STATS) : NULL;
    Py_DECREF(found);
    if (stats == NULL)
        goto fail;
    if (!PyBytes_Check(prefix)) {
        PyErr_SetString(PyExc_TypeError, "tx: a peer's prefix must be bytes");
        goto fail;
    }
    int found_one = PyBytes_GET_SIZE(prefix) == VXLAN_HEADROOM;
    if (found_one && !parse_addr(addr, AF_INET6, &h->route_sa))
        goto fail;
    h->route_found = found_one;
    h->route_prefix = prefix;
    h->route_stats = stats;
    Py_DECREF(addr);
    return found_one;
fail:
    Py_XDECREF(prefix);
    Py_XDECREF(addr);
    Py_XDECREF(stats);
    return -1;
}

/* Ipv6Path._sent: packets datagrams (bytes) sent to the peer of stats (a PeerStats) */
static int tx6_sent(drains_t *d, PyObject *stats, Py_ssize_t packets, Py_ssize_t bytes)
{
    d->counts[C_TX_PACKETS] += packets;
    d->counts[C_TX_BYTES] += bytes;
    d->counts[C_TX_PACKETS6] += packets;
    d->counts[C_TX_BYTES6] += bytes;
    if (stats == Py_None)
        return 1;
    pending_peer_t *p = pending_for(d, stats);
    if (p == NULL)
        return 0;
    p->tx_packets += packets;
    p->tx_bytes += bytes;
    p->last_tx = monotonic();
    return 1;
}

/* One sendto of data[0:length] to sa: 1 sent, 0 dropped (counted) */
static int tx6_sendto(drains_t *d, const struct sockaddr_in6 *sa, const uint8_t *data,
                      Py_ssize_t length)
{
    ssize_t r;
    do
        r = sendto(d->v6.sock_fd, data, (size_t)length, 0, (const struct sockaddr *)sa,
                   sizeof *sa);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        d->v6.drops[would_block(errno) ? D6_TX_SOCKET_FULL : D6_TX_SEND_ERROR]++;
        return 0;
    }
    return 1;
}

/* Ipv6Path._send_group: the segments b[begin:end] (each stride bytes, the last maybe
 * shorter) to sa (the peer of stats) in one GSO send, or one sendto each (GSO off, or
 * the GSO send failed). */
static int tx6_group(drains_t *d, const uint8_t *b, Py_ssize_t begin, Py_ssize_t end,
                     Py_ssize_t stride, const struct sockaddr_in6 *sa, PyObject *stats,
                     int *gso)
{
    half6_t *h = &d->v6;
    Py_ssize_t packets = (end - begin + stride - 1) / stride;
    if (*gso && packets > 1) {
        ssize_t r = send_gso(h->sock_fd, (const struct sockaddr *)sa, sizeof *sa, b + begin,
                             end - begin, stride);
        if (r >= 0) {
            if (!h->gso_sent) {
                if (!set(h->path, A_GSO_SENT, Py_True))
                    return 0;
                h->gso_sent = 1;
            }
            h->counts[K6_GSO_SENDS]++;
            d->counts[C_TX_GSO_SENDS]++;
            return tx6_sent(d, stats, packets, end - begin);
        }
        int e = errno;
        if (would_block(e)) {
            h->drops[D6_TX_SOCKET_FULL] += packets;
            return 1;
        }
        if (e == EINVAL && !h->gso_sent && !get_bool(h->path, A_GSO_SENT, &h->gso_sent))
            return 0;
        if (e == EIO || (e == EINVAL && !h->gso_sent))
            *gso = 0;
    }
    Py_ssize_t sent = 0, sent_bytes = 0;
    for (Py_ssize_t at = begin; at < end; at += stride) {
        Py_ssize_t length = stride < end - at ? stride : end - at;
        if (tx6_sendto(d, sa, b + at, length)) {
            sent++;
            sent_bytes += length;
        }
    }
    return !sent || tx6_sent(d, stats, sent, sent_bytes);
}

/* Ipv6Path.flush_tx: the open group to its peer (one GSO send, or a sendto for one) */
static int tx6_flush(drains_t *d, int *gso)
{
    half6_t *h = &d->v6;
    if (!h->group_count)
        return 1;
    int ok = tx6_group(d, h->group, 0, h->group_len, h->group_size, &h->group_sa,
                       h->group_stats, gso);
    forget_group6(h);
    return ok;
}

static inline int same_sa6(const struct sockaddr_in6 *a, const struct sockaddr_in6 *b)
{
    return a->sin6_port == b->sin6_port && memcmp(&a->sin6_addr, &b->sin6_addr, 16) == 0;
}

/* Ipv6Path._join: the datagram data[0:length] to the routed peer into the open group
 * (encap.gso.plan_groups' rule: one peer, every length the first's but the last, at
 * most MAX_RUN and MAX_GSO_BYTES), after sending the group it cannot join. */
static int tx6_join(drains_t *d, const uint8_t *data, Py_ssize_t length, int *gso)
{
    half6_t *h = &d->v6;
    if (h->group_count
        && !(h->group_last == h->group_size && length <= h->group_size
             && same_sa6(&h->group_sa, &h->route_sa)
             && h->group_len + length <= MAX_GSO_BYTES && h->group_count < MAX_RUN)
        && !tx6_flush(d, gso))
        return 0;
    if (length > MAX_GSO_BYTES) /* never: the MTU and a read's 64 KiB keep it below */
        return tx6_sendto(d, &h->route_sa, data, length) ? tx6_sent(d, h->route_stats, 1, length)
                                                          : 1;
    if (!h->group_count) {
        h->group_sa = h->route_sa;
        h->group_size = length;
        Py_XSETREF(h->group_stats, Py_NewRef(h->route_stats));
    }
    memcpy(h->group + h->group_len, data, (size_t)length);
    h->group_len += length;
    h->group_last = length;
    h->group_count++;
    return 1;
}

/* Ipv6Path._send_super: the GSO_TCPV6 super-packet at b[at + 22:][:length], routed, cut
 * in place behind the peer's prefix and sent in groups of at most MAX_RUN segments and
 * MAX_GSO_BYTES. 1: done here; 0: for the reference (a cut it refuses, segments beyond
 * the MTU); -1 on error. */
static int tx6_super(drains_t *d, const uint8_t hdr[10], Py_ssize_t at, Py_ssize_t length,
                     int *gso)
{
    uint8_t *b = d->arena.buf;
    if (d->arena.len - at < TX_ARENA6) /* the reference's arena is TX_ARENA6: cut as in it */
        return 0;
    uint16_t gso_size;
    memcpy(&gso_size, hdr + 4, 2);
    tcp_layout_t layout;
    char detail[96];
    if (check_tcp6(b, at + TX_ARENA6, at, length, gso_size, VXLAN_HEADROOM, &layout, detail,
                   sizeof detail)
        != NULL)
        return 0;
    Py_ssize_t stride = VXLAN_HEADROOM + layout.headers + gso_size;
    Py_ssize_t last = VXLAN_HEADROOM + layout.headers + layout.payload
                    - (layout.count - 1) * gso_size;
    Py_ssize_t first = layout.count > 1 ? stride : last;
    if (d->mtu && first - VXLAN_HEADROOM > d->mtu - 20)
        return 0;
    Py_ssize_t out[3];
    cut_segments(b + 0, at, gso_size, (const uint8_t *)PyBytes_AS_STRING(d->v6.route_prefix),
                 VXLAN_HEADROOM, &layout, out);
    d->v6.counts[K6_SUPER_READ]++;
    d->counts[C_TX_TUN_SUPER]++;
    Py_ssize_t total = (out[0] - 1) * out[1] + out[2];
    Py_ssize_t per_send = MAX_GSO_BYTES / stride < MAX_RUN ? MAX_GSO_BYTES / stride : MAX_RUN;
    if (per_send < 1)
        per_send = 1;
    for (Py_ssize_t begin = at; begin < at + total; begin += per_send * stride) {
        Py_ssize_t end = begin + per_send * stride < at + total ? begin + per_send * stride
                                                                : at + total;
        if (!tx6_group(d, b, begin, end, stride, &d->v6.route_sa, d->v6.route_stats, gso))
            return -1;
    }
    return 1;
}

/* Ipv6Path.send for the packet read at arena[at + 22:][:length] with its virtio_net_hdr:
 * 1 when done here, 0 when it goes to the reference (_send_ipv6), -1 on error. The prefix
 * goes in front of it, into the headroom it was read behind. */
static int tx6(drains_t *d, const uint8_t hdr[10], Py_ssize_t at, Py_ssize_t length, int *gso)
{
    uint8_t *b = d->arena.buf;
    const uint8_t *packet = b + at + VXLAN_HEADROOM;
    /* a super-packet: what the drain read before it leaves first (Ipv6Path.send) */
    if (hdr[1] == VNET_GSO_TCPV6 && d->v6.offload && !tx6_flush(d, gso))
        return -1;
    int routed = lookup_route6(d, packet + 24);
    if (routed <= 0)
        return routed;
    if (hdr[1] != VNET_GSO_NONE)
        return hdr[1] == VNET_GSO_TCPV6 && d->v6.offload ? tx6_super(d, hdr, at, length, gso) : 0;
    Py_ssize_t region[3];
    int csum = hdr[0] & VNET_NEEDS_CSUM;
    if (csum) {
        uint16_t start, offset;
        memcpy(&start, hdr + 6, 2);
        memcpy(&offset, hdr + 8, 2);
        if (!partial_region(at + VXLAN_HEADROOM, length, start, offset, region)) {
            d->v6.drops[D6_TX_BAD_CSUM]++;
            return 1;
        }
    }
    if (d->mtu && length > d->mtu - 20)
        return 0;
    if (csum)
        finish_regions(b, &region, 1);
    memcpy(b + at, PyBytes_AS_STRING(d->v6.route_prefix), VXLAN_HEADROOM);
    return tx6_join(d, b + at, VXLAN_HEADROOM + length, gso) ? 1 : -1;
}

/* Whether this wake-up's IPv6 packets go to the reference: the path's _one_by_one (a
 * trace or an impairment attached). And peers.routes6 for it: the kept route goes when it
 * is a new table. -1 on error. */
static int tx6_begin(drains_t *d, int *gso)
{
    half6_t *h = &d->v6;
    int one_by_one;
    if (!get_bool(h->path, A_ONE_BY_ONE, &one_by_one) || !get_bool(h->path, A_GSO, gso))
        return -1;
    PyObject *routes6 = get(d->peers, A_ROUTES6);
    if (routes6 == NULL)
        return -1;
    if (!PyList_Check(routes6)) {
        Py_DECREF(routes6);
        PyErr_SetString(PyExc_TypeError, "peers.routes6 must be a list");
        return -1;
    }
    if (routes6 != h->routes6) {
        forget_route6(h);
        h->routes6 = routes6;
    } else {
        Py_DECREF(routes6);
    }
    return one_by_one;
}

/* -- RX: Drains.rx6 -------------------------------------------------------------------- */

/* A sink of plan6 that writes into the TUN (Ipv6Path._write's loop) */
typedef struct {
    sink6_t sink;
    int fd;
    Py_ssize_t packets, bytes, supers;
    Py_ssize_t *drops;
} tun_sink6_t;

static int tun_write6(tun_sink6_t *s, struct iovec *iov, int n, Py_ssize_t count,
                      Py_ssize_t size)
{
    ssize_t r;
    do
        r = writev(s->fd, iov, n);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        s->drops[would_block(errno) ? D6_RX_TUN_FULL : D6_RX_TUN_ERROR] += count;
        return 1;
    }
    s->packets += count;
    s->bytes += size;
    s->supers += count > 1;
    return 1;
}

static int tun_plain6(sink6_t *sink, const uint8_t *d, Py_ssize_t start, Py_ssize_t end)
{
    struct iovec iov[2] = {{(void *)vnet_plain6, 10}, {(void *)(d + start), (size_t)(end - start)}};
    return tun_write6((tun_sink6_t *)sink, iov, 2, 1, end - start);
}

static int tun_super6(sink6_t *sink, const uint8_t vnet[10], const uint8_t *header,
                      Py_ssize_t hl, const uint8_t *d, const piece6_t *run, Py_ssize_t count,
                      Py_ssize_t size)
{
    struct iovec iov[2 + MAX_RUN];
    iov[0] = (struct iovec){(void *)vnet, 10};
    iov[1] = (struct iovec){(void *)header, (size_t)hl};
    for (Py_ssize_t i = 0; i < count; i++)
        iov[2 + i] = (struct iovec){(void *)(d + run[i].start + hl),
                                    (size_t)(run[i].end - run[i].start - hl)};
    return tun_write6((tun_sink6_t *)sink, iov, (int)(2 + count), count, size);
}

/* The sender of a receive: (ip, port) for the reference's methods, its sources
 * (peers.sources6_of) and its Peer (peers.by_public_ipv6, looked up when needed); kept
 * for the wake-up while receives come from the same address. */
typedef struct {
    struct sockaddr_in6 sa;
    PyObject *source, *sources, *peer; /* owned; peer NULL until looked up */
} sender6_t;

static void sender6_clear(sender6_t *s)
{
    Py_CLEAR(s->source);
    Py_CLEAR(s->sources);
    Py_CLEAR(s->peer);
}

static int sender6(drains_t *d, sender6_t *s, const struct sockaddr_in6 *sa)
{
    if (s->source != NULL && memcmp(&s->sa.sin6_addr, &sa->sin6_addr, 16) == 0
        && s->sa.sin6_port == sa->sin6_port)
        return 1;
    sender6_clear(s);
    char ip[INET6_ADDRSTRLEN];
    if (inet_ntop(AF_INET6, &sa->sin6_addr, ip, sizeof ip) == NULL)
        ip[0] = 0;
    s->sa = *sa;
    s->source = Py_BuildValue("(si)", ip, (int)ntohs(sa->sin6_port));
    PyObject *text = s->source ? PyTuple_GET_ITEM(s->source, 0) : NULL;
    s->sources = text ? PyObject_CallMethodOneArg(d->peers, attr[A_SOURCES6_OF], text) : NULL;
    return s->sources != NULL;
}

/* Ipv6Path._write's counts: what went into the TUN, the peer's share */
static int rx6_counted(drains_t *d, sender6_t *s, const tun_sink6_t *out)
{
    Py_ssize_t received = out->bytes + out->packets * VXLAN_HEADROOM;
    d->counts[C_RX_PACKETS] += out->packets;
    d->counts[C_RX_BYTES] += received;
    d->counts[C_RX_PACKETS6] += out->packets;
    d->counts[C_RX_BYTES6] += received;
    d->counts[C_RX_TUN_SUPER] += out->supers;
    d->v6.counts[K6_SUPER_WRITTEN] += out->supers;
    if (s->peer == NULL) {
        s->peer = PyObject_CallMethodOneArg(d->peers, attr[A_BY_PUBLIC_IPV6],
                                            PyTuple_GET_ITEM(s->source, 0));
        if (s->peer == NULL)
            return 0;
    }
    if (s->peer == Py_None)
        return 1;
    PyObject *stats = get(s->peer, A_STATS);
    pending_peer_t *p = stats ? pending_for(d, stats) : NULL;
    Py_XDECREF(stats); /* pending_for keeps its own reference */
    if (p == NULL)
        return 0;
    p->rx_packets += out->packets;
    p->rx_bytes += received;
    p->last_rx = monotonic();
    return 1;
}

/* A datagram that may be a neighbour solicitation: the reference's _native_ndp(base,
 * end, source), True when its inner packet goes into the TUN. 1/0, -1 on error. */
static int rx6_ndp(drains_t *d, sender6_t *s, Py_ssize_t base, Py_ssize_t end)
{
    PyObject *from = PyLong_FromSsize_t(base), *to = PyLong_FromSsize_t(end);
    PyObject *r = from && to ? PyObject_CallMethodObjArgs(d->v6.path, attr[A_NDP6], from, to,
                                                          s->source, NULL)
                             : NULL;
    Py_XDECREF(from);
    Py_XDECREF(to);
    if (r == NULL)
        return -1;
    int goes = PyObject_IsTrue(r);
    Py_DECREF(r);
    return goes;
}

/* Ipv6Path._receive_run: the receive rx[0:size] of segment-byte datagrams from s, each
 * checked (valid_pieces6's rules), the possible neighbour solicitations through the
 * reference, the valid ones written (plan6). */
static int rx6_run(drains_t *d, sender6_t *s, Py_ssize_t size, Py_ssize_t segment)
{
    half6_t *h = &d->v6;
    Py_ssize_t count = (size + segment - 1) / segment;
    int empty = PyObject_Not(s->sources);
    if (empty < 0)
        return 0;
    if (empty) {
        h->drops[D6_RX_UNKNOWN_PEER] += count;
        return 1;
    }
    if (s->sources != h->sources) {
        if (h->rules.sources != h->source_storage)
            PyMem_Free(h->rules.sources);
        Py_CLEAR(h->sources);
        if (!parse_rules6(&h->rules, h->source_storage, s->sources, h->own, h->vxlan_rules))
            return 0;
        h->sources = Py_NewRef(s->sources);
    }
    piece6_t local[2 * MAX_RUN], *pieces = local;
    if (count > MAX_RUN && (pieces = PyMem_Malloc(sizeof *pieces * 2 * (size_t)count)) == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    piece6_t *ndp = pieces + count;
    Py_ssize_t npieces = 0, nndp = 0;
    uint8_t *data = d->v6.rx.buf;
    for (Py_ssize_t base = 0; base < size; base += segment) {
        Py_ssize_t end = segment < size - base ? base + segment : size;
        int r = check_vxlan6(data, base, end, &h->rules);
        if (r == V6_NDP) {
            ndp[nndp++] = (piece6_t){base, end};
            continue;
        }
        if (r == V6_OK)
            r = check_inner6(data, base + VXLAN_HEADROOM, end, &h->rules);
        if (r == V6_OK)
            pieces[npieces++] = (piece6_t){base + VXLAN_HEADROOM, end};
        else
            h->drops[D6_V6 + r]++;
    }
    int ok = 1;
    for (Py_ssize_t i = 0; ok && i < nndp; i++) {
        int goes = rx6_ndp(d, s, ndp[i].start, ndp[i].end);
        ok = goes >= 0;
        /* what the reference passes has an IPv6 header: plan6 reads it */
        if (goes > 0 && ndp[i].end - ndp[i].start >= VXLAN_HEADROOM + 40)
            pieces[npieces++] = (piece6_t){ndp[i].start + VXLAN_HEADROOM, ndp[i].end};
    }
    if (ok && npieces) {
        tun_sink6_t out = {{tun_plain6, tun_super6}, d->tun_fd, 0, 0, 0, h->drops};
        ok = plan6(data, pieces, npieces, d->mtu, &out.sink) && (!out.packets || rx6_counted(d, s, &out));
    }
    if (pieces != local)
        PyMem_Free(pieces);
    return ok;
}

/* Ipv6Path._receive_gro: up to budget datagrams from the IPv6 socket */
static int rx6_loop(drains_t *d, sender6_t *s)
{
    half6_t *h = &d->v6;
    uint8_t *data = h->rx.buf;
    Py_ssize_t moved = 0;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    while (moved < d->budget) {
        struct sockaddr_in6 source;
        struct iovec iov = {data, (size_t)h->rx.len};
        struct msghdr msg = {
            .msg_name = &source,
            .msg_namelen = sizeof source,
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = control.buf,
            .msg_controllen = sizeof control.buf,
        };
        ssize_t got;
        do
            got = recvmsg(h->sock_fd, &msg, 0);
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (would_block(errno))
                break;
            h->drops[D6_RX_SOCKET_ERROR]++;
            moved++;
            continue;
        }
        if (msg.msg_namelen < sizeof source || source.sin6_family != AF_INET6)
            memset(&source, 0, sizeof source);
        Py_ssize_t size = got;
        Py_ssize_t segment = msg.msg_controllen && size ? gro_size(&msg, size) : size;
        moved += segment ? (size + segment - 1) / segment : 1;
        if (msg.msg_flags & MSG_TRUNC) {
            h->drops[D6_RX_TRUNCATED]++;
            continue;
        }
        if (!sender6(d, s, &source))
            return 0;
        if (!size) { /* an empty datagram: _receive_one's reasons */
            int empty = PyObject_Not(s->sources);
            if (empty < 0)
                return 0;
            h->drops[empty ? D6_RX_UNKNOWN_PEER : D6_V6 + V6_VX_TRUNC]++;
            continue;
        }
        if (segment != size) {
            h->counts[K6_GRO_RECEIVES]++;
            d->counts[C_RX_GRO_RECEIVES]++;
        }
        if (!rx6_run(d, s, size, segment))
            return 0;
    }
    return 1;
}

static PyObject *rx6_wake(drains_t *d)
{
    sender6_t s = {0};
    int ok = rx6_loop(d, &s);
    sender6_clear(&s);
    PyObject *type, *value, *traceback; /* counts are added even when an exception ends it */
    PyErr_Fetch(&type, &value, &traceback);
    int finished = drops6_now(d) && finish(d, NULL, NULL, 0);
    if (type != NULL)
        PyErr_Restore(type, value, traceback);
    return ok && finished && type == NULL ? Py_NewRef(Py_None) : NULL;
}

/* The IPv6 socket's reader: Ipv6Path.on_socket_readable(mtu) in C, or that method itself
 * with a trace or an impairment attached, or without UDP GRO. */
static PyObject *drains_rx6(drains_t *d, PyObject *unused)
{
    if (d->ready && d->v6.path == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Drains: the dataplane has no IPv6 half");
        return NULL;
    }
    if (!enter(d))
        return NULL;
    PyObject *result = NULL;
    int trace = traced(d), one_by_one = 0;
    if (trace >= 0 && get_bool(d->v6.path, A_ONE_BY_ONE, &one_by_one)) {
        if (trace || one_by_one || !d->v6.gro) {
            PyObject *mtu = PyLong_FromSsize_t(d->mtu);
            result = mtu ? PyObject_CallMethodOneArg(d->v6.path, attr[A_ON_SOCKET_READABLE6], mtu)
                         : NULL;
            Py_XDECREF(mtu);
        } else {
            result = rx6_wake(d);
        }
    }
    d->busy &= ~IN_DRAIN;
    return result;
}
