"""The engine key: what an engine the agent starts requires of its callers, derived from
the agent token that the agent (``control_plane.token``) and the control plane
(``auth.agent_token``) already share.

Why derived and not configured: the key must be the same on both sides and new to no
operator, and the agent token is the one secret they hold in common. The key is
HMAC-SHA256(agent token, :data:`CONTEXT`) in hex: knowing it (an engine logs it, a crash
dump holds it) does not give the agent token, which is what registers a node and receives
every tenant's prompts; the context names a version so a later scheme can differ. No
agent token: no key, and engines accept any caller, as before.

The agent passes it to each engine it starts in that engine's own variable (never on the
command line); the control plane sends ``Authorization: Bearer <key>`` to the backends
agents report. Both import :func:`derive` from here, the one home of the rule.
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
