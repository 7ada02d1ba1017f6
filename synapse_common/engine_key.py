"""The engine key derived from the agent token: what an older agent, one that chose no keys
of its own (:mod:`agent.node_keys`), gave the engines it started, and so what the control
plane presents to the engines of such an agent when it registered with that token.

HMAC-SHA256(agent token, :data:`CONTEXT`) in hex: knowing it (an engine logs it, a crash
dump holds it) does not give the agent token, which is what registers a node and receives
every tenant's prompts; the context names a version so a later scheme can differ. No agent
token: no key, and engines accept any caller, as before.

The header that presents a key to an engine (:func:`headers`) is the same for every key:
the control plane sends ``Authorization: Bearer <key>`` to the backends agents report, the
agent to its own probes.
"""

from __future__ import annotations

from synapse_common import subkeys

CONTEXT = b"synapse/engine-key/v1"


def derive(agent_token: str | None) -> str | None:
    """The engine key for ``agent_token``; None without a token (or an empty one)."""
    if not agent_token:
        return None
    return subkeys.derive(agent_token, CONTEXT).hex()


def headers(key: str | None) -> dict[str, str]:
    """The header that presents ``key`` to an engine (none without a key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}
