"""Free TCP ports on this machine, for processes started with a port chosen for them."""

from __future__ import annotations

import socket
from collections.abc import Collection


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now. Another process may take it before the caller
    binds it, so prefer port 0 where the caller can bind itself."""
    bind_host = host if host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind_host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> list[int]:
    """``count`` distinct ports nobody listens on right now, none of them in ``avoid``.

    Each stays bound until all are chosen: two :func:`free_port` calls in a row can return
    the same port (it is free again once the first probe closes), and two processes given
    one port cannot both start."""
    bind_host = host if host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((bind_host, 0))
            if s.getsockname()[1] in avoid:
                s.close()
                continue
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()
