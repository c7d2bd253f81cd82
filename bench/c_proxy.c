/*
 * The bench's reference row: a TUN <-> UDP proxy that forwards the way flanneld's own udp
 * backend does (its C proxy, pkg/backend/udp/proxy_amd64.c), written here from its
 * documented behaviour so that "faster than flannel's C proxy" is measured in the same run,
 * on the same testbed, not quoted.
 *
 * What it does, as flanneld's proxy does:
 * - one poll() over the TUN, the UDP socket and a control socket; after a wake-up it
 *   alternates one TUN read + sendto and one recv + TUN write, without polling again, until
 *   both return EAGAIN;
 * - one buffer of the TUN's MTU; the datagram is the inner IPv4 packet (flannel's udp wire
 *   format); packets shorter than an IPv4 header are dropped;
 * - the TTL is decremented in both directions with an incremental (RFC 1624) header
 *   checksum update; a packet whose TTL reaches 0 is dropped;
 * - routes are an array scanned first-match (not longest prefix), the hit moved to the
 *   front; no route: an ICMP net unreachable from the TUN's address goes back into the TUN;
 * - routes arrive on the control socket as flanneld's struct command (SET_ROUTE, DEL_ROUTE,
 *   STOP); the UDP socket keeps the kernel's default buffer sizes, as Go's ListenUDP does.
 *
 * Usage: c_proxy TUN_NAME TUN_ADDR MTU BIND_ADDR PORT   (the control socket is fd 0, an
 * AF_UNIX SOCK_SEQPACKET end; the caller configures the TUN's address, MTU and route).
 * Exits 0 on STOP or SIGTERM, 1 with one line on a setup error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

enum { CMD_SET_ROUTE = 1, CMD_DEL_ROUTE = 2, CMD_STOP = 3 };

/* flanneld's control message, field for field. */
struct command {
    int cmd;
    in_addr_t dest_net;
    int dest_net_len;
    in_addr_t next_hop_ip;
    short next_hop_port;
};

struct route {
    uint32_t net, mask; /* network order */
    struct sockaddr_in next_hop;
};

static struct route *routes;
static size_t route_count, route_room;
static uint32_t tun_address; /* network order */
static volatile sig_atomic_t stopping;

static void on_term(int signum) { (void)signum; stopping = 1; }

static uint32_t mask_of(int prefix_len) {
    if (prefix_len <= 0)
        return 0;
    if (prefix_len >= 32)
        return 0xFFFFFFFFu;
    return htonl(0xFFFFFFFFu << (32 - prefix_len));
}

static int set_route(uint32_t net, uint32_t mask, const struct sockaddr_in *hop) {
    for (size_t i = 0; i < route_count; i++) {
        if (routes[i].net == net && routes[i].mask == mask) {
            routes[i].next_hop = *hop;
            return 0;
        }
    }
    if (route_count == route_room) {
        size_t room = route_room ? 2 * route_room : 8;
        struct route *grown = realloc(routes, room * sizeof *grown);
        if (!grown)
            return -1;
        routes = grown;
        route_room = room;
    }
    routes[route_count].net = net;
    routes[route_count].mask = mask;
    routes[route_count].next_hop = *hop;
    route_count++;
    return 0;
}

static void del_route(uint32_t net, uint32_t mask) {
    for (size_t i = 0; i < route_count; i++) {
        if (routes[i].net == net && routes[i].mask == mask) {
            routes[i] = routes[--route_count];
            return;
        }
    }
}

/* First match, moved to the front: bursts to one destination hit entry 0. */
static const struct sockaddr_in *find_route(uint32_t dst) {
    for (size_t i = 0; i < route_count; i++) {
        if ((dst & routes[i].mask) == routes[i].net) {
            if (i) {
                struct route hit = routes[i];
                routes[i] = routes[0];
                routes[0] = hit;
            }
            return &routes[0].next_hop;
        }
    }
    return NULL;
}

static uint16_t checksum(const uint8_t *data, size_t len) {
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)data[i] << 8 | data[i + 1];
    if (len & 1)
        sum += (uint32_t)data[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}

/* TTL - 1 and the header checksum patched (RFC 1624); 0 when the packet must go. */
static int decrement_ttl(uint8_t *ip) {
    if (--ip[8] == 0)
        return 0;
    uint32_t sum = (uint32_t)(ip[10] << 8 | ip[11]) + 0x100; /* ~(~HC + ~m + m') */
    sum = (sum & 0xFFFF) + (sum >> 16);
    ip[10] = (uint8_t)(sum >> 8);
    ip[11] = (uint8_t)sum;
    return 1;
}

static void net_unreachable(int tun, const uint8_t *offender, size_t len) {
    size_t ihl = (size_t)(offender[0] & 0x0F) * 4;
    if (ihl < 20 || ihl > 60 || len < ihl + 8)
        return;
    if (offender[9] == IPPROTO_ICMP) /* no ICMP about ICMP (RFC 792) */
        return;
    if ((offender[6] & 0x1F) || offender[7]) /* only for a first fragment */
        return;
    uint8_t reply[20 + 8 + 60 + 8];
    size_t total = 20 + 8 + ihl + 8;
    memset(reply, 0, sizeof reply);
    reply[0] = 0x45;
    reply[2] = (uint8_t)(total >> 8);
    reply[3] = (uint8_t)total;
    reply[8] = 8; /* TTL, as flanneld's */
    reply[9] = IPPROTO_ICMP;
    memcpy(reply + 12, &tun_address, 4);
    memcpy(reply + 16, offender + 12, 4);
    uint16_t sum = checksum(reply, 20);
    reply[10] = (uint8_t)(sum >> 8);
    reply[11] = (uint8_t)sum;
    reply[20] = 3; /* destination unreachable */
    reply[21] = 0; /* net unreachable */
    memcpy(reply + 28, offender, ihl + 8);
    sum = checksum(reply + 20, 8 + ihl + 8);
    reply[22] = (uint8_t)(sum >> 8);
    reply[23] = (uint8_t)sum;
    if (write(tun, reply, total) < 0) {
        /* counted by nobody, as in flanneld */
    }
}

/* One TUN read + sendto; 1 when the TUN had something. */
static int tun_to_udp(int tun, int sock, uint8_t *buf, size_t size) {
    ssize_t n = read(tun, buf, size);
    if (n < 20)
        return n >= 0; /* a runt counts as activity, EAGAIN does not */
    uint32_t dst;
    memcpy(&dst, buf + 16, 4);
    const struct sockaddr_in *hop = find_route(dst);
    if (!hop) {
        net_unreachable(tun, buf, (size_t)n);
        return 1;
    }
    if (decrement_ttl(buf))
        sendto(sock, buf, (size_t)n, 0, (const struct sockaddr *)hop, sizeof *hop);
    return 1;
}

/* One recv + TUN write; 1 when the socket had something. */
static int udp_to_tun(int sock, int tun, uint8_t *buf, size_t size) {
    ssize_t n = recv(sock, buf, size, MSG_DONTWAIT);
    if (n < 20)
        return n >= 0;
    if (decrement_ttl(buf)) {
        while (write(tun, buf, (size_t)n) < 0 && (errno == EAGAIN || errno == EINTR)) {
        }
    }
    return 1;
}

/* One control message; -1 when the control socket is unusable (not a socket, say). */
static int control(int ctl) {
    struct command cmd;
    ssize_t n = recv(ctl, &cmd, sizeof cmd, MSG_DONTWAIT);
    if (n == 0) { /* the bench went away */
        stopping = 1;
        return 0;
    }
    if (n < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : -1;
    if (n != (ssize_t)sizeof cmd)
        return 0;
    uint32_t mask = mask_of(cmd.dest_net_len);
    if (cmd.cmd == CMD_SET_ROUTE) {
        struct sockaddr_in hop = {.sin_family = AF_INET};
        hop.sin_addr.s_addr = cmd.next_hop_ip;
        hop.sin_port = htons((uint16_t)cmd.next_hop_port);
        if (set_route(cmd.dest_net & mask, mask, &hop) < 0)
            fprintf(stderr, "c_proxy: out of memory for routes\n");
    } else if (cmd.cmd == CMD_DEL_ROUTE) {
        del_route(cmd.dest_net & mask, mask);
    } else if (cmd.cmd == CMD_STOP) {
        stopping = 1;
    }
    return 0;
}

static int fail(const char *what) {
    fprintf(stderr, "c_proxy: error: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: c_proxy TUN_NAME TUN_ADDR MTU BIND_ADDR PORT (control: fd 0)\n");
        return 2;
    }
    long mtu = strtol(argv[3], NULL, 10);
    long port = strtol(argv[5], NULL, 10);
    struct sockaddr_in bind_to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (mtu < 68 || mtu > 65535 || port < 1 || port > 65535 ||
        inet_pton(AF_INET, argv[2], &tun_address) != 1 ||
        inet_pton(AF_INET, argv[4], &bind_to.sin_addr) != 1 || strlen(argv[1]) >= IFNAMSIZ) {
        fprintf(stderr, "c_proxy: error: bad arguments\n");
        return 2;
    }

    int tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (tun < 0)
        return fail("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
    if (ioctl(tun, TUNSETIFF, &ifr) < 0)
        return fail("TUNSETIFF");
    if (fcntl(tun, F_SETFL, O_NONBLOCK) < 0)
        return fail("O_NONBLOCK");

    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return fail("socket");
    if (bind(sock, (struct sockaddr *)&bind_to, sizeof bind_to) < 0)
        return fail("bind");

    struct sigaction term = {.sa_handler = on_term}; /* no SA_RESTART: poll returns EINTR */
    sigaction(SIGTERM, &term, NULL);
    sigaction(SIGINT, &term, NULL);

    uint8_t *buf = malloc((size_t)mtu);
    if (!buf)
        return fail("malloc");
    struct pollfd fds[3] = {{.fd = tun, .events = POLLIN},
                            {.fd = sock, .events = POLLIN},
                            {.fd = 0, .events = POLLIN}};
    fprintf(stdout, "ready\n");
    fflush(stdout);
    while (!stopping) {
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            return fail("poll");
        }
        if (fds[2].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL) && control(0) < 0)
            return fail("control socket (fd 0)");
        if ((fds[0].revents | fds[1].revents) & POLLIN) {
            int active;
            do {
                active = tun_to_udp(tun, sock, buf, (size_t)mtu);
                active += udp_to_tun(sock, tun, buf, (size_t)mtu);
            } while (active && !stopping);
        }
    }
    free(buf);
    free(routes);
    return 0;
}
