"""Byte-exact transfers between two pods of a testbed: the program that runs in each pod
(``python -m overlay.lab.transfer MODE ...``) and the checks that run it (``transfer``,
``udp_transfer``), used by the netns tests and the barrage.

server: accept one connection, read to EOF, print "<bytes> <sha256>".
client: send N bytes of a deterministic stream, print "<bytes> <sha256>".
udp-server: receive datagrams until the client's end marker (or 3 s of silence), print
  "<intact> <damaged>": each datagram carries its number and the bytes derived from it.
udp-client: send N such datagrams of SIZE bytes (paced), then the end marker.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHUNK = 1 << 16


def _stream(total: int) -> Iterator[bytes]:
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


def _family(address: str) -> socket.AddressFamily:
    """The socket family of ``address`` (IPv6 when it has a colon)."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def server(address: str, port: int) -> None:
    with socket.create_server((address, port), family=_family(address)) as listener:
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
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
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
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        for number in range(count):
            sock.sendto(_datagram(number, size), (address, port))
            if number % 32 == 31:
                time.sleep(0.001)  # well below what the path carries: nothing is lost
        for _ in range(3):
            sock.sendto(END, (address, port))
    print(count, flush=True)


# -- the checks, run from outside the pods -------------------------------------------------


class TransferMismatch(AssertionError):
    """What arrived is not what was sent (or the transfer did not run)."""


def _command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "overlay.lab.transfer", *argv]


@contextmanager
def serving(bed: Any, pod: str, argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """This program's server in ``pod``, once it says it is ready; killed after."""
    server = bed.popen(pod, _command(*argv), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise TransferMismatch(f"the {argv[0]} in {pod} did not start")
        yield server
    finally:
        server.kill()
        server.wait()


def transfer(
    bed: Any,
    client_pod: str,
    server_pod: str,
    total: int,
    port: int = 5201,
    timeout: float = 120,
    version: int | None = None,
) -> None:
    """``total`` bytes over TCP from one pod to another (to its address of IP ``version``,
    4 or 6, when given); the byte count and sha256 seen by the receiver must equal the
    sender's."""
    address = bed.pod_ip(server_pod, version) if version else bed.pod_ip(server_pod)
    with serving(bed, server_pod, ["server", address, str(port)]) as server:
        client = bed.exec(
            client_pod,
            _command("client", address, str(port), str(total)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if client.returncode != 0:
            raise TransferMismatch(client.stderr)
        sent = client.stdout.split()
        if int(sent[0]) != total:
            raise TransferMismatch(f"{client_pod} sent {sent[0]} of {total} bytes")
        assert server.stdout is not None
        received = server.stdout.readline().split()
        if received != sent:
            raise TransferMismatch(f"{client_pod} -> {server_pod}: sent {sent}, got {received}")


def udp_transfer(
    bed: Any, client_pod: str, server_pod: str, count: int, size: int = 1400, port: int = 5401
) -> tuple[int, int]:
    """``count`` datagrams of ``size`` bytes from one pod to another: (intact, damaged)
    as the receiving socket saw them. A datagram the receiving kernel drops (bad
    checksum, wrong length) is neither."""
    address = bed.pod_ip(server_pod)
    with serving(bed, server_pod, ["udp-server", address, str(port)]) as server:
        client = bed.exec(
            client_pod,
            _command("udp-client", address, str(port), str(count), str(size)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if client.returncode != 0:
            raise TransferMismatch(client.stderr)
        assert server.stdout is not None
        intact, damaged = map(int, server.stdout.readline().split())
        return intact, damaged


def main(argv: list[str]) -> None:
    mode, address, port = argv[0], argv[1], int(argv[2])
    if mode == "server":
        server(address, port)
    elif mode == "client":
        client(address, port, int(argv[3]))
    elif mode == "udp-server":
        udp_server(address, port)
    else:
        udp_client(address, port, int(argv[3]), int(argv[4]))


if __name__ == "__main__":
    main(sys.argv[1:])
