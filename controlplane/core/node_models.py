"""Which models a node may claim (``registry.node_models``, an operator's opt-in).

A node is sent the prompts of every tenant asking for a model one of its backends reports,
and every node holds the shared agent token (with ``auth.agent_review``, a node's own
credential still lets it name any model). :mod:`controlplane.core.engine_hosts` checks
*where* a reported backend is; this module checks *which* models the node says it serves.

Off by default (``None``: any model, as before): comparing claims with the control
plane's placement alone would refuse the static engines an agent's own config runs (the
quick start's), which the control plane never placed. So the operator lists them:

* ``node_models`` maps a node name to the model names it may serve, as its agent reports
  them (a backend's ``served_model_names``, else its model; compared exactly: an alias
  the control plane resolves, or a static upstream's ``model_names``, plays no part);
* the ``*`` key (:data:`ANY_NODE`) is the list of every node without an entry of its own.
  A node's own entry replaces it (never merged), so a node can be held to less than the
  rest; with no ``*`` key, an unlisted node may serve only what was placed on it;
* every node may also serve the models the control plane placed on it itself
  (``DeployModel``: the node's desired engines in the stored intent,
  :func:`placed_models`), whether listed or not, so a deploy needs no config change.

A backend that claims any model its node may not serve is left out whole (not routed to,
probed or scraped), not trimmed to the models it may serve: the rest of its report comes
from the same engine, whose claim is in part false, and a backend that simply vanishes
with a warning is a misconfiguration the operator sees at once, where a silently shorter
model list is one that surfaces as 404s later. The same rule covers the models a
Register says the node's in-process embedder serves (``embed_models``, where
``/v1/embeddings`` and the cache send tenants' texts): each one not allowed is dropped.

The shapes of a node name and a model name (:data:`NODE_NAME`, :data:`MODEL_NAME`) have
their one home here: :mod:`controlplane.api.agent_messages` checks the names an agent
reports with them, and the setting's names are checked alike, so an entry no agent could
ever report is a typo, refused at start with the field named.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

ANY_NODE = "*"
MAX_MODEL_NAME = 256
NODE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,252})")
MODEL_NAME = re.compile(r"[^\x00-\x1f\x7f-\xa0\u2028\u2029\u200b-\u200f\u202a-\u202e]"
                        f"{{1,{MAX_MODEL_NAME}}}")


def node_key_problem(node: str) -> str | None:
    """Why ``node`` cannot be a key of ``registry.node_models`` (None: it can)."""
    if node == ANY_NODE or NODE_NAME.fullmatch(node):
        return None
    return (f"{node!r} is no node name: letters, digits, '.', '_' and '-' (at most 253 "
            f"characters), or {ANY_NODE!r} for every node without an entry")


def model_name_problem(model: str) -> str | None:
    """Why ``model`` cannot be a model name in ``registry.node_models`` (None: it can)."""
    if MODEL_NAME.fullmatch(model):
        return None
    return (f"a model name is 1 to {MAX_MODEL_NAME} characters without control "
            "characters, as the agent reports it")


def placed_models(desired: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """The model names a node's control-plane-placed engines report: each desired
    engine's ``servedModelNames``, else its ``model`` (the agent's rule)."""
    names: set[str] = set()
    for spec in desired.values():
        served = spec.get("servedModelNames") or spec.get("served_model_names")
        if isinstance(served, list) and served:
            names.update(str(m) for m in served)
        elif spec.get("model"):
            names.add(str(spec["model"]))
    return frozenset(names)


@dataclasses.dataclass(frozen=True)
class Claims:
    """``registry.node_models`` as the report path reads it; ``listed`` None: off."""

    listed: Mapping[str, frozenset[str]] | None = None

    @classmethod
    def parse(cls, setting: Mapping[str, Iterable[str]] | None) -> Claims:
        if setting is None:
            return cls()
        return cls({node: frozenset(models) for node, models in setting.items()})

    @property
    def checked(self) -> bool:
        return self.listed is not None

    def refused(self, node: str, models: Iterable[str],
                placed: frozenset[str] = frozenset()) -> list[str]:
        """Those of ``models`` that ``node`` may not serve (none when the check is off);
        ``placed``: what the control plane placed on it (:func:`placed_models`)."""
        if self.listed is None:
            return []
        own = self.listed.get(node)
        allowed = own if own is not None else self.listed.get(ANY_NODE, frozenset())
        return [m for m in models if m not in allowed and m not in placed]
