"""`overlay status`: what a running daemon knows, served as JSON on a Unix socket."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_SOCKET = "/run/flannel/overlay.sock"


async def serve(path: Path, snapshot: Callable[[], dict[str, Any]]) -> asyncio.AbstractServer:
    """Answer every connection with one JSON document, then close it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(snapshot()).encode() + b"\n")
        try:
            await writer.drain()
        finally:
            writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(answer, path=str(path))
    os.chmod(path, 0o600)
    return server


def query(path: str | os.PathLike[str], timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="overlay status", description=__doc__)
    parser.add_argument(
        "--status-socket",
        default=os.environ.get("FLANNELD_STATUS_SOCKET", DEFAULT_SOCKET),
        help=f"the daemon's status socket (default {DEFAULT_SOCKET})",
    )
    args = parser.parse_args(argv)
    try:
        status = query(args.status_socket)
    except (OSError, ValueError) as e:
        sys.stderr.write(
            f"overlay status: error: no daemon answers on {args.status_socket} ({e})\n"
        )
        return 1
    print(json.dumps(status, indent=2))
    return 0
