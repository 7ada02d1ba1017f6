"""The two keys an agent chooses for its own node, new at every start.

- ``engine``: what the engines this agent starts require of their callers (each gets it
  in its own environment variable, :mod:`synapse_common.engine_key`).
- ``node``: what this agent's Node service requires as ``authorization: Bearer`` (the
  control plane's ``Node.Embed`` and ``Node.ScorePairs`` calls).

The agent sends both in ``Register`` over its authenticated stream, and the control plane
presents each node's own keys to that node alone. Why chosen here and not derived from the
shared agent token: a key derived from a secret every node holds is a key every node's
holder can compute, and a control plane that hands one fleet-wide key (or the shared
token itself) to whatever address a Register names gives it away to whoever registered.
A per-node key that leaks opens that node only, and the agent need not hold the shared
token at all (``control_plane.token_file`` with a Kubernetes service-account token).

An agent that presents no token (``control_plane`` without ``token`` or ``token_file``)
chooses no keys: its engines accept any caller and its Node service follows
``grpc.allow_unauthenticated``, as before.
"""

from __future__ import annotations

import dataclasses
import secrets


@dataclasses.dataclass(frozen=True)
class NodeKeys:
    engine: str = dataclasses.field(repr=False)
    node: str = dataclasses.field(repr=False)


def choose() -> NodeKeys:
    """Two new random keys (256 bits each)."""
    return NodeKeys(engine=secrets.token_hex(32), node=secrets.token_hex(32))
