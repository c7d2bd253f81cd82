"""Byte-exact transfer checks, run inside pod namespaces by the netns tests.

server: accept one connection, read to EOF, print "<bytes> <sha256>".
client: send N bytes of a deterministic stream, print "<bytes> <sha256>".
udp-server: receive datagrams until the client's end marker (or 3 s of silence), print
  "<intact> <damaged>": each datagram carries its number and the bytes derived from it.
udp-client: send N such datagrams of SIZE bytes (paced), then the end marker.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time

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


END = b"end"


def _datagram(number: int, size: int) -> bytes:
    body = hashlib.sha256(number.to_bytes(8, "big")).digest() * (size // 32 + 1)
    return number.to_bytes(8, "big") + body[: size - 8]


def udp_server(address: str, port: int) -> None:
    intact = damaged = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind((address, port))
        print("ready", flush=True)
        sock.settimeout(30)  # the first datagram
        while True:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            sock.settimeout(3)
            if data == END:
                break
            number = int.from_bytes(data[:8], "big")
            if data == _datagram(number, len(data)):
                intact += 1
            else:
                damaged += 1
    print(intact, damaged, flush=True)


def udp_client(address: str, port: int, count: int, size: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for number in range(count):
            sock.sendto(_datagram(number, size), (address, port))
            if number % 32 == 31:
                time.sleep(0.001)  # well below what the path carries: nothing is lost
        for _ in range(3):
            sock.sendto(END, (address, port))
    print(count, flush=True)


if __name__ == "__main__":
    mode, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        server(address, port)
    elif mode == "client":
        client(address, port, int(sys.argv[4]))
    elif mode == "udp-server":
        udp_server(address, port)
    else:
        udp_client(address, port, int(sys.argv[4]), int(sys.argv[5]))
