"""systemd's readiness protocol: a datagram to $NOTIFY_SOCKET (Type=notify services)."""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> bool:
    """Send MESSAGE (e.g. "READY=1") to systemd when it asked for notifications; False otherwise."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError:
        return False
    return True
