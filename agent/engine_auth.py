"""Whether the agent's embedder calls one of the agent's own engines, and so presents this
node's engine key (:mod:`agent.node_keys`) to it.

``embedder.kind: tei`` often names the TEI the agent itself supervises
(``tei_url: http://127.0.0.1:8001`` beside a ``tei`` backend on port 8001); that engine
requires the key like any other the agent starts. A ``tei_url`` elsewhere is not ours:
it never receives the key, which would let whoever runs it call our engines. Ours means:
the port of a configured backend the agent starts (not ``external``), on a host that is
this node (loopback, ``supervisor.engine_host`` or ``supervisor.advertise_host``).
"""

from __future__ import annotations

import urllib.parse

from agent.config import AgentSettings
from synapse_common import engine_key

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def own_engine(url: str, cfg: AgentSettings) -> bool:
    """Whether ``url`` is an engine this agent starts from its config."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    sup = cfg.supervisor
    hosts = LOOPBACK | {h for h in (sup.engine_host, sup.advertise_host) if h}
    ports = {b.port for b in cfg.backends if b.engine != "external" and b.port}
    return parts.hostname in hosts and port in ports


def embedder_headers(cfg: AgentSettings, key: str | None) -> dict[str, str]:
    """The header presenting this node's engine ``key`` to the embedder's TEI when it is
    one of ours (else none)."""
    url = cfg.embedder.tei_url
    if cfg.embedder.kind != "tei" or not url or not own_engine(url, cfg):
        return {}
    return engine_key.headers(key)
