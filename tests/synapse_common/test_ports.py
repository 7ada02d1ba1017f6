"""Ports chosen for processes a command starts (``synapse up``'s agent, engine, servers)."""

from __future__ import annotations

import socket

from synapse_common import ports


def test_free_ports_are_distinct_free_and_avoid_the_ones_asked_for() -> None:
    avoid = {ports.free_port()}
    for _ in range(50):
        got = ports.free_ports(5, avoid=avoid)
        assert len(set(got)) == 5, f"two of the ports coincide: {got}"
        assert not avoid & set(got)
    for port in got:     # each can be bound: nothing listens on it
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
