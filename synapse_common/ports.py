"""Free TCP ports on this machine, for processes started with a port chosen for them."""

from __future__ import annotations

import collections
import socket
import threading
from collections.abc import Collection

# Ports this process handed out lately. The kernel may give the same port to two probes
# in a row (it is free again once the first probe closes), so `http, grpc = free_port(),
# free_port()` could name one port twice and the second server would fail to bind.
_RECENT_LIMIT = 1024
_recent: collections.deque[int] = collections.deque(maxlen=_RECENT_LIMIT)
_recent_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now and that this process has not handed out
    lately. Another process may take it before the caller binds it, so prefer port 0
    where the caller can bind itself."""
    with _recent_lock:
        port = free_ports(1, host, avoid=_recent)[0]
        _recent.append(port)
        return port


def free_ports(count: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> list[int]:
    """``count`` distinct ports nobody listens on right now, none of them in ``avoid``.

    Each stays bound until all are chosen: two :func:`free_port` calls in a row can return
    the same port (it is free again once the first probe closes), and two processes given
    one port cannot both start."""
    bind_host = host if host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    held: list[socket.socket] = []
    refused: list[socket.socket] = []    # kept bound so the kernel cannot offer them again
    try:
        while len(held) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((bind_host, 0))
            (refused if s.getsockname()[1] in avoid else held).append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held + refused:
            s.close()
