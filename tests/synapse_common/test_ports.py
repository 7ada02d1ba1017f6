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


def test_free_port_never_hands_out_a_port_twice_in_a_row() -> None:
    """`http, grpc = free_port(), free_port()` once named one port twice (the kernel offers
    a port again as soon as the probe closes) and the second server could not bind."""
    got = [ports.free_port() for _ in range(500)]
    assert len(set(got)) == len(got), "free_port handed out a port it had handed out lately"
