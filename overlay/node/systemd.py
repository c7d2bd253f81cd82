"""systemd's readiness protocol (sd_notify) without libsystemd: one datagram to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace). ``READY=1`` once the daemon forwards, ``STOPPING=1`` when it shuts down, as
flanneld sends them; without ``$NOTIFY_SOCKET`` (not under systemd) nothing is sent."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET`` (abstract names start with a NUL byte)."""
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # unset, or a kind we do not speak (vsock:)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=..."); True when it was sent."""
    address = notify_address(environ)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True
