/* encap._native: the dataplane's per-byte and per-packet work in C.
 *
 * Each function here implements exactly the rules of a pure-Python function in encap/
 * (the reference and test oracle; tests/encap/test_native.py proves them equal byte for
 * byte):
 *
 *   segment_tcp4, segment_tcp6,         encap.tso   (TX: TSO segmentation, checksums)
 *   finish_checksums
 *   plan_groups                         encap.gso   (TX: GSO groups)
 *   drop_reason, valid_pieces,          encap.gso   (RX: validation, TUN write plan)
 *   plan_tun_writes
 *   valid_pieces6, plan_tun_writes6     encap.ipv6  (RX: vxlan's IPv6 half)
 *   Drains (tx, rx, rx6, flush)         overlay.dataplane.udp.UdpDataplane's reader
 *                                       callbacks, each in one call (the drains), and
 *                                       overlay.dataplane.ipv6.Ipv6Path's
 *   poll_after                          overlay.dataplane.busy_poll (--busy-poll-us)
 *
 * One translation unit: this file holds the module (its method table and init) and
 * includes the others, each after what it uses, so every function stays static and the
 * compiler inlines across them as in one file. Each is named after its reference:
 * errors.c, checksum.c, tso.c, gso.c and ipv6.c mirror encap/errors.py,
 * encap/checksum.py, encap/tso.py, encap/gso.py and encap/ipv6.py; drains.c (the object), drains_send.c (Drains.tx) and
 * drains_receive.c (Drains.rx) mirror overlay/dataplane/send.py and receive.py,
 * drains_ipv6.c (Drains.tx's IPv6 packets, Drains.rx6) overlay/dataplane/ipv6.py.
 *
 * Every offset and length is checked against the buffer before it is used; nothing here
 * reads or writes outside the buffers it is given, whatever the input. The GIL is kept
 * throughout (README.md, "The native codecs"): the calls last microseconds in a dataplane
 * with one loop thread per process. The one exception is poll_after's wait (up to the
 * --busy-poll-us window), which releases it.
 */
#include "common.h"

#include "errors.c"
#include "checksum.c"
#include "tso.c"
#include "gso.c"
#include "ipv6.c"
#include "drains.c"
#include "drains_send.c"
#include "drains_receive.c"
#include "drains_ipv6.c"
#include "busy_poll.c"

/* -- the module ------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"segment_tcp4", segment_tcp4, METH_VARARGS,
     "segment_tcp4(buf, at, length, gso_size, prefix) -> (count, stride, last): encap.tso's."},
    {"segment_tcp6", segment_tcp6, METH_VARARGS,
     "segment_tcp6(buf, at, length, gso_size, prefix) -> (count, stride, last): encap.tso's."},
    {"plan_groups", plan_groups, METH_VARARGS,
     "plan_groups(lengths, keys, max_segments=64, max_bytes=65000): encap.gso's."},
    {"finish_checksums", finish_checksums, METH_VARARGS,
     "finish_checksums(buf, regions): encap.tso's."},
    {"valid_pieces6", valid_pieces6, METH_VARARGS,
     "valid_pieces6(data, size, segment, sources, destination, drops, vxlan, ndp): "
     "encap.ipv6's."},
    {"plan_tun_writes6", plan_tun_writes6, METH_VARARGS,
     "plan_tun_writes6(data, pieces, mtu): encap.ipv6's, with copies (bytes) where the "
     "reference has memoryviews."},
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
    {"poll_after", poll_after, METH_VARARGS,
     "poll_after(first, first_fd, other, other_fd, window_ns) -> polls: "
     "overlay.dataplane.busy_poll's polling_after, one wake-up, the wait without the GIL."},
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
    for (int r = 1; r < V6_COUNT; r++) {
        v6_reason_strings[r] = PyUnicode_InternFromString(v6_reason_names[r]);
        if (v6_reason_strings[r] == NULL)
            return -1;
    }
    for (int r = 1; r < D6_COUNT; r++) {
        d6_reason_strings[r] = r < D6_V6 ? PyUnicode_InternFromString(d6_reason_names[r])
                             : r > D6_V6 ? Py_NewRef(v6_reason_strings[r - D6_V6])
                                         : NULL;
        if (d6_reason_strings[r] == NULL && r != D6_V6)
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
