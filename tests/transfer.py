"""A byte-exact TCP transfer check, run inside pod namespaces by the netns tests.

server: accept one connection, read to EOF, print "<bytes> <sha256>".
client: send N bytes of a deterministic stream, print "<bytes> <sha256>".
"""

from __future__ import annotations

import hashlib
import socket
import sys

CHUNK = 1 << 16


def _stream(total: int):
    block = hashlib.sha256(b"overlay").digest() * (CHUNK // 32)
    counter = 0
    sent = 0
    while sent < total:
        # Vary every chunk so a dropped or duplicated chunk changes the hash.
        chunk = counter.to_bytes(8, "big") + block[8:]
        chunk = chunk[: total - sent]
        yield chunk
        sent += len(chunk)
        counter += 1


def server(address: str, port: int) -> None:
    with socket.create_server((address, port)) as listener:
        print("ready", flush=True)
        conn, _ = listener.accept()
        digest = hashlib.sha256()
        received = 0
        with conn:
            while data := conn.recv(1 << 20):
                digest.update(data)
                received += len(data)
    print(received, digest.hexdigest(), flush=True)


def client(address: str, port: int, total: int) -> None:
    digest = hashlib.sha256()
    with socket.create_connection((address, port), timeout=30) as conn:
        for chunk in _stream(total):
            digest.update(chunk)
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    print(total, digest.hexdigest(), flush=True)


if __name__ == "__main__":
    mode, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        server(address, port)
    else:
        client(address, port, int(sys.argv[4]))
