/* encap._native: Drains.rx, peer -> TUN: one call per wake-up of the socket's reader.
 * Reference: overlay/dataplane/receive.py, ReceivePath.on_socket_readable_gro (and
 * on_socket_readable without GRO) and what they call:
 *
 *   rx_loop                        the receive loop of on_socket_readable_gro (gro), else
 *     rx_gather                      on_socket_readable's; gathering single datagrams
 *   rx_deliver                     _deliver: the sender (rx_sender, rx_rules), the plan
 *     write_plan, answer_arp         (gso.c), _write_planned / _write_pieces, _answer_arp
 *   rx_wake, drains_rx             on_socket_readable_gro / on_socket_readable
 *
 * tests/overlay/dataplane/test_fastpath.py and tests/encap/test_native.py compare it with
 * the reference on real sockets: every byte written and every count.
 */

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

/* d->rules.sources for a sender's sources: parsed again only when they are not the
 * object the last ones were parsed from (the receives mostly come from one sender). */
static inline int rx_rules(drains_t *d, PyObject *sources)
{
    if (sources == d->sources)
        return 1;
    sources_free(&d->rules, d->source_storage);
    Py_CLEAR(d->sources);
    if (!parse_sources(&d->rules, d->source_storage, sources))
        return 0;
    d->sources = Py_NewRef(sources);
    return 1;
}

/* vxlan: the ARP requests of a receive from source, each to
 * dataplane._answer_arp(start, end, (ip, port)) before the buffer is reused. */
static int answer_arp(drains_t *d, const plan_t *plan, const struct sockaddr_in *source,
                      Py_ssize_t size, Py_ssize_t segment)
{
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &source->sin_addr, ip, sizeof ip);
    PyObject *peer = Py_BuildValue("(si)", ip, (int)ntohs(source->sin_port));
    if (peer == NULL)
        return 0;
    for (Py_ssize_t i = 0; i < plan->narp; i++) {
        Py_ssize_t at = plan->arp[i], end = at + segment < size ? at + segment : size;
        PyObject *from = PyLong_FromSsize_t(at), *to = PyLong_FromSsize_t(end);
        PyObject *r = from && to ? PyObject_CallMethodObjArgs(d->dp, attr[A_ANSWER_ARP], from,
                                                              to, peer, NULL)
                                 : NULL;
        Py_XDECREF(from);
        Py_XDECREF(to);
        if (r == NULL) {
            Py_DECREF(peer);
            return 0;
        }
        Py_DECREF(r);
    }
    Py_DECREF(peer);
    return 1;
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
    if (!rx_rules(d, sources))
        goto done;
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
    if (plan.narp && !answer_arp(d, &plan, source, size, segment))
        goto done;
    ok = 1;
done:
    plan_free(&plan);
    Py_DECREF(entry);
    return ok;
}

static inline int same_source(const struct sockaddr_in *a, const struct sockaddr_in *b)
{
    return a->sin_addr.s_addr == b->sin_addr.s_addr && a->sin_port == b->sin_port;
}

/* The open run: single datagrams of one source gathered back to back at the front of the
 * RX buffer (at bytes so far, each of size bytes but a shorter last); none when at is 0. */
typedef struct {
    Py_ssize_t at, size;
    struct sockaddr_in source;
} rx_run_t;

/* UdpDataplane.on_socket_readable_gro's gathering, for a receive of size bytes at
 * data[run->at:] (one datagram when segment is size, else a GRO receive): a datagram that
 * fits the open run joins it (a short one, or 64 KiB, ends it); anything else ends the
 * open run, then a single datagram opens one (or goes alone when a second would not fit)
 * and a GRO receive is delivered. 0 on error. */
static inline int rx_gather(drains_t *d, rx_t *x, rx_run_t *run,
                            const struct sockaddr_in *source, Py_ssize_t size,
                            Py_ssize_t segment)
{
    uint8_t *data = d->rx.buf;
    int single = segment == size;
    if (run->at) {
        if (single && same_source(source, &run->source) && size <= run->size) {
            run->at += size;
            if (size < run->size || run->at + run->size > MAX_DATAGRAM) { /* a short one ends it */
                Py_ssize_t end = run->at;
                run->at = 0;
                if (!rx_deliver(d, x, &run->source, end, run->size))
                    return 0;
            }
            return 1;
        }
        Py_ssize_t end = run->at;
        run->at = 0;
        if (!rx_deliver(d, x, &run->source, end, run->size)) /* then this one from the front */
            return 0;
        memmove(data, data + end, (size_t)size);
    }
    if (single) {
        if (2 * size > MAX_DATAGRAM) /* a second one would not fit: nothing to gather */
            return rx_deliver(d, x, source, size, size);
        run->at = run->size = size;
        run->source = *source;
        return 1;
    }
    d->counts[C_RX_GRO_RECEIVES]++;
    return rx_deliver(d, x, source, size, segment);
}

/* UdpDataplane.on_socket_readable_gro's loop (gro), else on_socket_readable's. */
static int rx_loop(drains_t *d, rx_t *x)
{
    uint8_t *data = d->rx.buf;
    Py_ssize_t moved = 0, room = d->rx.len;
    rx_run_t run = {0};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    while (moved < d->budget) {
        struct sockaddr_in source;
        struct iovec iov = {data + run.at, (size_t)(room - run.at)};
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
        if (!rx_gather(d, x, &run, &source, size, segment))
            return 0;
    }
    if (run.at && !rx_deliver(d, x, &run.source, run.at, run.size))
        return 0;
    return 1;
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

/* UdpDataplane.on_socket_readable_gro (on_socket_readable without gro) */
static PyObject *drains_rx(drains_t *d, PyObject *unused)
{
    return wake(d, d->gro ? A_ON_SOCKET_READABLE_GRO : A_ON_SOCKET_READABLE, rx_wake);
}
