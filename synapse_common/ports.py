"""Free TCP ports on this machine, for processes started with a port chosen for them."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now. Another process may take it before the caller
    binds it, so prefer port 0 where the caller can bind itself."""
    bind_host = host if host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind_host, 0))
        return int(s.getsockname()[1])
