"""A paced TCP stream for restart tests, run inside pod namespaces: the receiver reports
what arrived and the longest pause in it.

server ADDRESS PORT: print "ready", accept one connection, read to EOF, print
    "<bytes> <sha256> <longest gap between two receives, seconds>".
client ADDRESS PORT SECONDS RATE: send a deterministic stream at RATE bytes/s for SECONDS,
    print "<bytes> <sha256>".
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time

CHUNK = 16 * 1024


def server(address: str, port: int) -> None:
    with socket.create_server((address, port)) as listener:
        print("ready", flush=True)
        conn, _ = listener.accept()
        digest = hashlib.sha256()
        received = 0
        gap = 0.0
        last = None
        with conn:
            while data := conn.recv(1 << 20):
                now = time.monotonic()
                if last is not None:
                    gap = max(gap, now - last)
                last = now
                digest.update(data)
                received += len(data)
    print(received, digest.hexdigest(), f"{gap:.3f}", flush=True)


def client(address: str, port: int, seconds: float, rate: float) -> None:
    digest = hashlib.sha256()
    sent = 0
    counter = 0
    base = hashlib.sha256(b"stream").digest() * (CHUNK // 32)
    with socket.create_connection((address, port), timeout=60) as conn:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            due = rate * elapsed - sent
            if due < CHUNK:
                time.sleep(CHUNK / rate / 4)
                continue
            chunk = counter.to_bytes(8, "big") + base[8:]
            counter += 1
            digest.update(chunk)
            conn.sendall(chunk)  # blocks while the path is down: the stream waits
            sent += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    print(sent, digest.hexdigest(), flush=True)


if __name__ == "__main__":
    mode, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        server(address, port)
    else:
        client(address, port, float(sys.argv[4]), float(sys.argv[5]))
