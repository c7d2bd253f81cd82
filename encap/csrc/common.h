/* encap._native: what every part of the module uses; module.c includes it first.
 *
 * The C API and system headers, the TCP flags (encap/tso.py's _FIN, _PSH, _CWR,
 * encap/gso.py's _ACK, _PSH) and the big-endian field reads and writes the Python
 * reference does with int.from_bytes / to_bytes.
 */
#ifndef ENCAP_CSRC_COMMON_H
#define ENCAP_CSRC_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* -- TCP flags -------------------------------------------------------------------------- */

#define FIN 0x01
#define PSH 0x08
#define ACK 0x10
#define CWR 0x80

/* -- big-endian fields ------------------------------------------------------------------ */

static inline uint32_t be16(const uint8_t *p)
{
    return (uint32_t)p[0] << 8 | p[1];
}

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

#endif
