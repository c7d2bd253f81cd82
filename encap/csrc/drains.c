/* encap._native: the Drains object, the dataplane's two reader callbacks in C, one call
 * per wake-up. This file is the object: the fixed attributes read once (drains_new), the
 * lookups kept from one wake-up to the next, the counts kept until flush(), the wake-up
 * guard (wake) and the type. Its two methods are in drains_send.c (Drains.tx: TUN -> peer)
 * and drains_receive.c (Drains.rx: peer -> TUN), which module.c includes after this file;
 * vxlan's IPv6 half (dataplane.ipv6, half6_t here) is in drains_ipv6.c: Drains.tx sends
 * the IPv6 packets it reads, Drains.rx6 is the IPv6 socket's reader.
 *
 * Drains(dataplane, budget).tx and .rx are the reader callbacks of
 * overlay.dataplane.udp.UdpDataplane (on_tun_readable, on_socket_readable_gro /
 * on_socket_readable) with everything they call, in C: the Python methods are the
 * reference, run when a trace is attached or the module is missing, and the tests prove
 * the two equal (tests/overlay/dataplane/test_fastpath.py, tests/encap/test_native.py).
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
 * only for the rare events that need it: a packet without a route (_no_route), one with
 * DF longer than the MTU (_too_big: queued before the MTU was lowered), an ARP request
 * (_answer_arp of overlay.dataplane.vxlan.VxlanDataplane), a drop reason counted for the
 * first time (overlay.observe.drop_log.Drops.__missing__). The MTU is read once, too: the
 * dataplane makes a new Drains when it changes (UdpDataplane.set_mtu).
 */

#define BATCH_MAX 64        /* overlay.dataplane.counters.BATCH_MAX */
#define MAX_DATAGRAM 65535  /* overlay.dataplane.limits.MAX_DATAGRAM */

enum {
    A_TUN, A_FD, A_VNET_HDR, A_SOCK, A_HEADROOM, A_TX_ARENA, A_RX_BUFFER, A_TSO,
    A_GSO, A_GSO_SENT, A_GRO, A_TUN_GSO, A_MTU, A_VXLAN_RULES, A_OWN, A_PEERS, A_ROUTES,
    A_SENDERS, A_ADDR, A_PREFIX, A_NO_ROUTE, A_TOO_BIG, A_ANSWER_ARP, A_COUNTERS, A_DROPS,
    A_TX_BATCH, A_RX_BATCH, A_TX_PACKETS, A_TX_BYTES, A_TX_GSO_SENDS, A_TX_TUN_SUPER,
    A_RX_PACKETS, A_RX_BYTES, A_RX_TUN_SUPER, A_RX_GRO_RECEIVES, A_LAST_TX, A_LAST_RX, A_TAP,
    A_ON_TUN_READABLE, A_ON_SOCKET_READABLE, A_ON_SOCKET_READABLE_GRO, A_SEND_IPV6,
    /* vxlan's IPv6 half (drains_ipv6.c) */
    A_IPV6, A_ONE_BY_ONE, A_OWN6, A_ROUTES6, A_STATS, A_DROPS6, A_TX_PACKETS6, A_TX_BYTES6,
    A_RX_PACKETS6, A_RX_BYTES6, A_GSO_SENDS, A_TUN_SUPER_READ, A_GRO_RECEIVES,
    A_TUN_SUPER_WRITTEN, A_SOURCES6_OF, A_BY_PUBLIC_IPV6, A_ON_SOCKET_READABLE6, A_NDP6,
    A_COUNT
};
static const char *const attr_names[A_COUNT] = {
    "tun", "fd", "vnet_hdr", "sock", "headroom", "_tx_arena", "_rx_buffer", "tso",
    "gso", "_gso_sent", "gro", "tun_gso", "mtu", "vxlan_rules", "_own", "peers", "routes",
    "senders", "addr", "prefix", "_no_route", "_too_big", "_answer_arp", "counters", "drops",
    "tx_batch", "rx_batch", "tx_packets", "tx_bytes", "tx_gso_sends", "tx_tun_super_packets",
    "rx_packets", "rx_bytes", "rx_tun_super_packets", "rx_gro_receives", "last_tx", "last_rx",
    "tap", "on_tun_readable", "on_socket_readable", "on_socket_readable_gro", "_send_ipv6",
    "ipv6", "_one_by_one", "own", "routes6", "stats", "drops6", "tx_packets6", "tx_bytes6",
    "rx_packets6", "rx_bytes6", "gso_sends", "tun_super_packets_read", "gro_receives",
    "tun_super_packets_written", "sources6_of", "by_public_ipv6", "on_socket_readable",
    "_native_ndp",
};
static PyObject *attr[A_COUNT];

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
    C_RX_TUN_SUPER, C_RX_GRO_RECEIVES, C_TX_PACKETS6, C_TX_BYTES6, C_RX_PACKETS6,
    C_RX_BYTES6, C_COUNT
};
static const int counter_attrs[C_COUNT] = {
    A_TX_PACKETS, A_TX_BYTES, A_TX_GSO_SENDS, A_TX_TUN_SUPER, A_RX_PACKETS, A_RX_BYTES,
    A_RX_TUN_SUPER, A_RX_GRO_RECEIVES, A_TX_PACKETS6, A_TX_BYTES6, A_RX_PACKETS6,
    A_RX_BYTES6,
};

/* The IPv6 half's own counts (overlay status: ipv6_*), added to dataplane.ipv6 */
enum { K6_GSO_SENDS, K6_SUPER_READ, K6_GRO_RECEIVES, K6_SUPER_WRITTEN, K6_COUNT };
static const int counter6_attrs[K6_COUNT] = {
    A_GSO_SENDS, A_TUN_SUPER_READ, A_GRO_RECEIVES, A_TUN_SUPER_WRITTEN,
};

/* The IPv6 half's drops counted in C, added to counters.drops and counters.drops6: the
 * send errors, what its receive loop drops, and valid_pieces6's reasons (D6_V6 + V6_*). */
enum {
    D6_NONE, D6_TX_SOCKET_FULL, D6_TX_SEND_ERROR, D6_TX_BAD_CSUM, D6_RX_UNKNOWN_PEER,
    D6_RX_TRUNCATED, D6_RX_SOCKET_ERROR, D6_RX_TUN_FULL, D6_RX_TUN_ERROR, D6_V6,
    D6_COUNT = D6_V6 + V6_COUNT
};
static const char *const d6_reason_names[D6_V6] = {
    NULL, "tx_socket_full", "tx_send_error", "tx_bad_csum_offsets", "rx_unknown_peer",
    "rx_truncated", "rx_socket_error", "rx_tun_full", "rx_tun_error",
};
static PyObject *d6_reason_strings[D6_COUNT];

/* dataplane.ipv6 (vxlan's IPv6 half with EnableIPv6) as the drains see it: its fixed
 * attributes read once, its lookups kept while peers.routes6 is the same object. */
typedef struct {
    PyObject *path; /* the Ipv6Path, owned; NULL without an IPv6 half */
    int sock_fd, offload, gro, gso_sent;
    PyObject *own, *vxlan_rules; /* owned: what rules6 was parsed from, with sources */
    rules6_t rules;
    subnet6_t source_storage[8];
    PyObject *sources; /* the sources rules.sources were parsed from (owned) */
    PyObject *rx_obj;  /* the path's receive buffer (owned), exported for our lifetime */
    Py_buffer rx;
    PyObject *routes6; /* owned */
    uint8_t route_dst[16];
    int route_found;
    struct sockaddr_in6 route_sa;
    PyObject *route_prefix, *route_stats; /* owned; route_prefix NULL: nothing kept */
    Py_ssize_t counts[K6_COUNT];
    Py_ssize_t drops[D6_COUNT];
    /* The open group of a send drain's small packets (Ipv6Path._join): datagrams to
     * group_sa back to back in group[0:group_len], each group_size bytes but the last
     * (group_last); sent (tx6_flush) when one cannot join, before a super-packet and at
     * the end of the drain. group_stats: the first one's peer's (owned). */
    struct sockaddr_in6 group_sa;
    PyObject *group_stats;
    Py_ssize_t group_len, group_size, group_last, group_count;
    uint8_t group[MAX_GSO_BYTES];
} half6_t;

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
    Py_ssize_t tx_limit; /* the longest packet read from the TUN that goes (mtu, 0: any) */
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
    half6_t v6;
} drains_t;

#define IN_DRAIN 1
#define IN_FLUSH 2

/* The IPv6 half's route lookup kept (peers.routes6 changed: forgotten) */
static void forget_route6(half6_t *h)
{
    Py_CLEAR(h->routes6);
    Py_CLEAR(h->route_prefix);
    Py_CLEAR(h->route_stats);
    h->route_found = 0;
}

/* The open group forgotten, unsent (an error ended the drain, or the drains go) */
static void forget_group6(half6_t *h)
{
    Py_CLEAR(h->group_stats);
    h->group_len = h->group_size = h->group_last = h->group_count = 0;
}

static void half6_clear(half6_t *h)
{
    forget_route6(h);
    forget_group6(h);
    if (h->rules.sources != NULL && h->rules.sources != h->source_storage)
        PyMem_Free(h->rules.sources);
    h->rules.sources = h->source_storage;
    h->rules.nsources = 0;
    Py_CLEAR(h->sources);
    if (h->rx.obj != NULL)
        PyBuffer_Release(&h->rx);
    Py_CLEAR(h->rx_obj);
    Py_CLEAR(h->own);
    Py_CLEAR(h->vxlan_rules);
    Py_CLEAR(h->path);
}

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
    for (int c = 0; d->v6.path != NULL && c < K6_COUNT; c++)
        if (!add_pending(d->v6.path, counter6_attrs[c], &d->v6.counts[c]))
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
    Py_VISIT(d->v6.path);
    Py_VISIT(d->v6.own);
    Py_VISIT(d->v6.vxlan_rules);
    Py_VISIT(d->v6.sources);
    Py_VISIT(d->v6.rx_obj);
    Py_VISIT(d->v6.routes6);
    Py_VISIT(d->v6.route_prefix);
    Py_VISIT(d->v6.route_stats);
    Py_VISIT(d->v6.group_stats);
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
    half6_clear(&d->v6);
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

/* dataplane.ipv6 when there is one (vxlan with EnableIPv6), its fixed attributes */
static int half6_new(drains_t *d)
{
    half6_t *h = &d->v6;
    h->rules.sources = h->source_storage;
    PyObject *path = PyObject_GetAttr(d->dp, attr[A_IPV6]);
    if (path == NULL) { /* the udp backend's dataplane has none */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return 0;
        PyErr_Clear();
        return 1;
    }
    if (path == Py_None) {
        Py_DECREF(path);
        return 1;
    }
    h->path = path;
    PyObject *tx_arena = NULL, *none = PyTuple_New(0); /* a sender's sources come later */
    int ok = none != NULL && get_fd(path, A_SOCK, &h->sock_fd) && get_bool(path, A_GRO, &h->gro)
          && get_bool(path, A_GSO_SENT, &h->gso_sent)
          && (tx_arena = get(path, A_TX_ARENA)) != NULL
          && (h->offload = PyObject_IsTrue(tx_arena)) >= 0
          && (h->own = get(path, A_OWN6)) != NULL
          && (h->vxlan_rules = get(path, A_VXLAN_RULES)) != NULL
          && parse_rules6(&h->rules, h->source_storage, none, h->own, h->vxlan_rules)
          && (h->rx_obj = get(path, A_RX_BUFFER)) != NULL
          && PyObject_GetBuffer(h->rx_obj, &h->rx, PyBUF_WRITABLE) == 0;
    Py_XDECREF(tx_arena);
    Py_XDECREF(none);
    PyObject *peers = ok ? get(path, A_PEERS) : NULL, *counters = NULL;
    if (peers != NULL && (counters = get(path, A_COUNTERS)) != NULL
        && (peers != d->peers || counters != d->counters)) {
        PyErr_SetString(PyExc_ValueError,
                        "Drains: the IPv6 half shares the dataplane's peers and counters");
        ok = 0;
    }
    ok = ok && counters != NULL;
    Py_XDECREF(peers);
    Py_XDECREF(counters);
    if (ok && h->rx.len < MAX_DATAGRAM) {
        PyErr_SetString(PyExc_ValueError, "Drains: the IPv6 receive buffer is under 64 KiB");
        ok = 0;
    }
    if (ok && d->headroom != VXLAN_HEADROOM) {
        PyErr_SetString(PyExc_ValueError, "Drains: an IPv6 half needs the vxlan headroom");
        ok = 0;
    }
    return ok;
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
    if (!half6_new(d))
        goto fail;
    d->coalesce = tun_gso && d->vnet; /* super-packets need the virtio_net_hdr */
    d->tx_limit = d->mtu ? d->mtu : MAX_DATAGRAM; /* SendPath._read_tun's limit */
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

/* Drains.tx and Drains.rx: drains_send.c and drains_receive.c, included after this file */
static PyObject *drains_tx(drains_t *d, PyObject *unused);
static PyObject *drains_rx(drains_t *d, PyObject *unused);
static PyObject *drains_rx6(drains_t *d, PyObject *unused); /* drains_ipv6.c */

static PyMethodDef drains_methods[] = {
    {"tx", (PyCFunction)drains_tx, METH_NOARGS,
     "UdpDataplane.on_tun_readable: read the TUN (up to budget reads), route, cut, send."},
    {"rx", (PyCFunction)drains_rx, METH_NOARGS,
     "UdpDataplane.on_socket_readable_gro (on_socket_readable without gro): receive, "
     "gather, validate, write to the TUN."},
    {"rx6", (PyCFunction)drains_rx6, METH_NOARGS,
     "Ipv6Path.on_socket_readable (vxlan's IPv6 half): receive, validate, write to the "
     "TUN."},
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
