/* encap._native: poll_after, one --busy-poll-us wake-up in C. overlay/dataplane/busy_poll.py
 * holds the reference (polling_after), says why a window at all, and makes the reader
 * callback (functools.partial of this function: no Python frame per wake-up).
 *
 * poll_after(first, first_fd, other, other_fd, window_ns) -> polls: call first (the drain
 * the loop woke us for), then poll both fds until window_ns after the call began: first
 * again while only its fd is readable; other once, and return, when its fd is. Returns
 * how many poll() calls it made (the tests bound it).
 *
 * Between two empty polls it calls sched_yield(): the vCPU stays awake, so the next hop
 * of the round trip finds a running process instead of a halted vCPU to wake, yet a
 * runnable pod process on this CPU gets it at once (a plain spin made the RTT worse on 2
 * vCPUs: README, "Ping and busy-poll"). The wait runs with the GIL released, so the
 * daemon's other threads (the registry's) are not held up by it. Blocking in ppoll()
 * with the rest of the window as its timeout was measured too, and bought nothing over
 * the event loop (the wake-up of a halted vCPU is the cost, not the loop's dispatch).
 *
 * The window starts when the call does and is never extended; it is checked against
 * CLOCK_MONOTONIC before every poll. An fd the kernel calls invalid (POLLNVAL: closed
 * under us) raises ValueError instead of being polled for the rest of the window.
 */

#include <poll.h>
#include <sched.h>

#define MAX_WINDOW_NS 1000000000LL /* a sanity bound: the CLI allows 10 ms (MAX_BUSY_POLL_US) */

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Poll fds[0] and fds[1], without the GIL, until one is readable or the deadline passes.
 * Returns the number of ready fds (0: the window ended), or -1 with errno set; adds the
 * poll() calls made to *polls. */
static int wait_ready(struct pollfd *fds, long long deadline, long *polls)
{
    while (now_ns() < deadline) {
        int n = poll(fds, 2, 0);
        ++*polls;
        if (n < 0 && errno != EINTR)
            return -1;
        if (n > 0)
            return n;
        sched_yield();
    }
    return 0;
}

static int call_drain(PyObject *drain)
{
    PyObject *r = PyObject_CallNoArgs(drain);
    Py_XDECREF(r);
    return r != NULL;
}

static int poll_after_args(PyObject *first, int first_fd, PyObject *other, int other_fd,
                           long long window_ns)
{
    if (!PyCallable_Check(first) || !PyCallable_Check(other)) {
        PyErr_SetString(PyExc_TypeError, "poll_after: first and other must be callable");
        return 0;
    }
    if (first_fd < 0 || other_fd < 0 || first_fd == other_fd) {
        PyErr_SetString(PyExc_ValueError, "poll_after: two distinct fds >= 0 are needed");
        return 0;
    }
    if (window_ns < 0 || window_ns > MAX_WINDOW_NS) {
        PyErr_SetString(PyExc_ValueError, "poll_after: the window is 0 to 1 s");
        return 0;
    }
    return 1;
}

static PyObject *poll_after(PyObject *self, PyObject *args)
{
    PyObject *first, *other;
    int first_fd, other_fd;
    long long window_ns;
    if (!PyArg_ParseTuple(args, "OiOiL", &first, &first_fd, &other, &other_fd, &window_ns)
        || !poll_after_args(first, first_fd, other, other_fd, window_ns))
        return NULL;
    long long deadline = now_ns() + window_ns;
    long polls = 0;
    if (!call_drain(first))
        return NULL;
    struct pollfd fds[2] = {{.fd = first_fd, .events = POLLIN},
                            {.fd = other_fd, .events = POLLIN}};
    for (;;) {
        int n, err;
        Py_BEGIN_ALLOW_THREADS
        n = wait_ready(fds, deadline, &polls);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n < 0) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (n == 0)
            break;
        if ((fds[0].revents | fds[1].revents) & POLLNVAL) {
            PyErr_SetString(PyExc_ValueError, "poll_after: an fd is not open");
            return NULL;
        }
        if (fds[1].revents) {
            if (!call_drain(other))
                return NULL;
            break;
        }
        if (!call_drain(first))
            return NULL;
    }
    return PyLong_FromLong(polls);
}
