"""Connection limits both gRPC servers (the agent's Node port, the control plane's port)
are built with, in one place.

``grpc.max_concurrent_streams`` caps the calls open at once on one connection (HTTP/2
SETTINGS_MAX_CONCURRENT_STREAMS): a client past it waits for a call of its own to end,
it is not refused. Each server picks its cap from its real use (see the callers).

``grpc.max_connection_idle_ms`` closes (with a GOAWAY) a connection that has had no call
open for that long. gRPC counts idle from the end of the last call, not from the last
byte: a connection carrying an open stream (an agent's long-lived ``Connect``) is never
idle, and pings do not count as calls, so a peer that only keeps the connection alive
with pings is closed too. A client whose connection was closed dials again on its next
call.

No ``grpc.max_connection_age_ms``: it would end an agent's ``Connect`` stream at that
age whatever the grace, and the agent would register again each time.
"""

from __future__ import annotations

CONNECTION_IDLE_MS = 5 * 60 * 1000


def server_options(max_concurrent_streams: int | None) -> list[tuple[str, int]]:
    """The limit options of a gRPC server; ``max_concurrent_streams`` None leaves the
    stream count uncapped (gRPC's default)."""
    options = [("grpc.max_connection_idle_ms", CONNECTION_IDLE_MS)]
    if max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
    return options
