"""Which queue of a multi-queue TUN a packet leaving the host goes to: by flow hash.

Without a steering program the kernel's "automq" remembers, per flow, the queue that last
*wrote* a packet of that flow into the TUN and sends the flow's outgoing packets to that
queue (good for a VM's vhost thread). For us it pins every flow to whichever worker
receives from the flow's peer: flannel's wire format gives all traffic between two nodes
one UDP 4-tuple, so SO_REUSEPORT hands it all to one socket, and with automq all of the
TX towards that peer followed it into the same worker (nearly all of it, measured:
bench/results/design-measurements.md). A small BPF program attached with
TUNSETSTEERINGEBPF returns the packet's own flow hash instead, so outgoing flows are
spread over the queues however the replies arrive.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from errno import EAGAIN

# include/uapi/linux/if_tun.h, include/uapi/linux/bpf.h
TUNSETSTEERINGEBPF = 0x800454E0
BPF_PROG_LOAD = 5
LOAD_ATTEMPTS = 5  # as libbpf
BPF_PROG_TYPE_SOCKET_FILTER = 1
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
SKB_HASH_OFFSET = 68  # offsetof(struct __sk_buff, hash)


def _insn(code: int, dst: int, src: int, off: int, imm: int) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


# The queue is the program's result (as u16) modulo the number of queues. skb->hash is
# there for TCP (the sending socket's per-connection hash) but 0 for unconnected UDP, and
# a socket filter may not call bpf_get_hash_recalc, so the fallback hashes the packet:
# source ^ destination address (IPv6: the eight 32-bit words of both), ^ the ports word
# for TCP/UDP (IPv4: a first fragment; IPv6: the next header right after the fixed
# header, no extension header), mixed so that the low bits (which pick the queue) depend
# on every input bit: x ^= x >> 16, x *= 0x9E3779B9, x ^= x >> 16. LD_ABS/LD_IND read
# the IP header (a TUN has no link-layer header; the version nibble picks the family) and
# end the program with 0 (queue 0) if the packet is too short. Jumps: offset = target -
# (this instruction + 1); the IPv6 branch jumps back to the shared mix (no loop).
_IPV4 = [
    _insn(0x20, 0, 0, 0, 12),  # 6: r0 = source address
    _insn(0xBF, 7, 0, 0, 0),  # 7: r7 = r0
    _insn(0x20, 0, 0, 0, 16),  # 8: r0 = destination address
    _insn(0xAF, 7, 0, 0, 0),  # 9: r7 ^= r0
    _insn(0x30, 0, 0, 0, 9),  # 10: r0 = protocol
    _insn(0x15, 0, 0, 2, 6),  # 11: if r0 == TCP goto 14
    _insn(0x15, 0, 0, 1, 17),  # 12: if r0 == UDP goto 14
    _insn(0x05, 0, 0, 9, 0),  # 13: goto 23 (mix)
    _insn(0x28, 0, 0, 0, 6),  # 14: r0 = flags + fragment offset
    _insn(0x57, 0, 0, 0, 0x1FFF),  # 15: r0 &= fragment offset
    _insn(0x55, 0, 0, 6, 0),  # 16: if r0 != 0 goto 23 (not the first fragment)
    _insn(0x30, 0, 0, 0, 0),  # 17: r0 = version + IHL
    _insn(0x57, 0, 0, 0, 0x0F),  # 18: r0 &= IHL
    _insn(0x67, 0, 0, 0, 2),  # 19: r0 <<= 2 (header length in bytes)
    _insn(0xBF, 8, 0, 0, 0),  # 20: r8 = r0
    _insn(0x40, 0, 8, 0, 0),  # 21: r0 = the 4 bytes at r8: source + destination port
    _insn(0xAF, 7, 0, 0, 0),  # 22: r7 ^= r0
]
_MIX = [
    _insn(0xBC, 0, 7, 0, 0),  # 23: w0 = w7
    _insn(0xBC, 1, 0, 0, 0),  # 24: w1 = w0
    _insn(0x74, 1, 0, 0, 16),  # 25: w1 >>= 16
    _insn(0xAC, 0, 1, 0, 0),  # 26: w0 ^= w1
    _insn(0x24, 0, 0, 0, -0x61C88647),  # 27: w0 *= 0x9E3779B9
    _insn(0xBC, 1, 0, 0, 0),  # 28: w1 = w0
    _insn(0x74, 1, 0, 0, 16),  # 29: w1 >>= 16
    _insn(0xAC, 0, 1, 0, 0),  # 30: w0 ^= w1
    _insn(0x95, 0, 0, 0, 0),  # 31: exit
]
_IPV6 = [
    _insn(0x20, 0, 0, 0, 8),  # 32: r0 = source address, first word
    _insn(0xBF, 7, 0, 0, 0),  # 33: r7 = r0
    # 34..47: r7 ^= each further word of the source (12..23) and destination (24..39)
    *(
        insn
        for offset in range(12, 40, 4)
        for insn in (_insn(0x20, 0, 0, 0, offset), _insn(0xAF, 7, 0, 0, 0))
    ),
    _insn(0x30, 0, 0, 0, 6),  # 48: r0 = next header
    _insn(0x15, 0, 0, 2, 6),  # 49: if r0 == TCP goto 52
    _insn(0x15, 0, 0, 1, 17),  # 50: if r0 == UDP goto 52
    _insn(0x05, 0, 0, -29, 0),  # 51: goto 23 (mix)
    _insn(0x20, 0, 0, 0, 40),  # 52: r0 = source + destination port
    _insn(0xAF, 7, 0, 0, 0),  # 53: r7 ^= r0
    _insn(0x05, 0, 0, -32, 0),  # 54: goto 23 (mix)
]
PROGRAM = b"".join(
    [
        _insn(0xBF, 6, 1, 0, 0),  # 0: r6 = r1 (LD_ABS wants the skb in r6)
        _insn(0x61, 0, 6, SKB_HASH_OFFSET, 0),  # 1: r0 = skb->hash
        _insn(0x55, 0, 0, 28, 0),  # 2: if r0 != 0 goto 31 (exit)
        _insn(0x30, 0, 0, 0, 0),  # 3: r0 = version + IHL (IPv6: version + traffic class)
        _insn(0x57, 0, 0, 0, 0xF0),  # 4: r0 &= version
        _insn(0x15, 0, 0, 26, 0x60),  # 5: if version == 6 goto 32
        *_IPV4,
        *_MIX,
        *_IPV6,
    ]
)


def load_hash_program() -> int:
    """Load PROGRAM; the returned fd stays valid until closed. Raises OSError."""
    if SYS_BPF is None:
        raise OSError(0, f"no bpf syscall number known for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(PROGRAM, len(PROGRAM))
    license_ = ctypes.create_string_buffer(b"GPL")
    # union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level,
    # log_size, log_buf, kern_version; the rest zero.
    attr = struct.pack(
        "<IIQQIIQI",
        BPF_PROG_TYPE_SOCKET_FILTER,
        len(PROGRAM) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        0,
        0,
        0,
        0,
    ).ljust(128, b"\0")
    buffer = ctypes.create_string_buffer(attr, len(attr))
    # The verifier gives up with EAGAIN when a signal arrives while it runs; libbpf
    # retries that (PROG_LOAD_ATTEMPTS), and so do we.
    for _ in range(LOAD_ATTEMPTS):
        fd = libc.syscall(SYS_BPF, BPF_PROG_LOAD, buffer, len(attr))
        if fd >= 0:
            return int(fd)
        errno = ctypes.get_errno()
        if errno != EAGAIN:
            break
    raise OSError(errno, f"loading the TUN steering program: {os.strerror(errno)}")


def steer_by_flow_hash(tun_fd: int) -> None:
    """Attach PROGRAM as the TUN's queue selector (the device keeps its own reference).
    Raises OSError when the kernel refuses (no CAP_BPF/CAP_SYS_ADMIN, Linux < 4.16)."""
    prog = load_hash_program()
    try:
        fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog))
    finally:
        os.close(prog)
