"""Operator intent that must outlive a replica: cordons, drains and deployed engines.

The intent lives in a :class:`IntentStore` — Redis when ``redis.url`` is configured, so a
restarted or second replica honours it; this process's memory otherwise — and is applied
to the registry by :meth:`FleetIntent.sync`, which the Admin service runs at start and
every second. Nodes that register later (or re-register) get their cordon within one sync,
and a cordon can be set for a node that is not connected yet.

``desired`` is the complete set of control-plane-managed engines per node, keyed by
backend name, holding BackendSpec fields as plain data; the Admin service sends it to the
node's agent as ``DesiredBackends`` whenever it changes (and after a sync that found a
different set, so another replica's deploy reaches agents connected here too).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Protocol

from controlplane.core import registry as registry_mod


@dataclasses.dataclass(frozen=True, slots=True)
class NodeIntent:
    cordoned: bool = False
    draining: bool = False
    reason: str = ""
    desired: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"cordoned": self.cordoned, "draining": self.draining,
                           "reason": self.reason, "desired": dict(self.desired)},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NodeIntent:
        data = json.loads(text)
        return cls(bool(data.get("cordoned")), bool(data.get("draining")),
                   str(data.get("reason", "")), dict(data.get("desired", {})))


class IntentStore(Protocol):
    """Node name → intent as JSON text (adapters know nothing of NodeIntent)."""

    async def load(self) -> dict[str, str]: ...

    async def save(self, node: str, text: str) -> None: ...


class MemoryIntentStore:
    def __init__(self) -> None:
        self._data: dict[str, str] = {}

    async def load(self) -> dict[str, str]:
        return dict(self._data)

    async def save(self, node: str, text: str) -> None:
        self._data[node] = text


class FleetIntent:
    def __init__(self, store: IntentStore, registry: registry_mod.Registry) -> None:
        self._store = store
        self._registry = registry
        self.intents: dict[str, NodeIntent] = {}

    def get(self, node: str) -> NodeIntent:
        return self.intents.get(node, NodeIntent())

    async def update(self, node: str, **changes: Any) -> NodeIntent:
        """Change one node's intent, persist it and apply it to the registry."""
        await self.refresh()
        intent = dataclasses.replace(self.get(node), **changes)
        await self._store.save(node, intent.to_json())
        self.intents[node] = intent
        self.apply()
        return intent

    async def refresh(self) -> set[str]:
        """Reload from the store; returns nodes whose desired engines changed."""
        loaded = {k: NodeIntent.from_json(v) for k, v in (await self._store.load()).items()}
        changed = {n for n in set(loaded) | set(self.intents)
                   if loaded.get(n, NodeIntent()).desired != self.get(n).desired}
        self.intents = loaded
        return changed

    def apply(self) -> None:
        # Only real changes touch the registry: each one bumps its routing-set version.
        for view in self._registry.nodes():
            intent = self.get(view.info.name)
            if view.cordoned != intent.cordoned:
                self._registry.cordon(view.info.name, intent.cordoned)
            if view.draining != intent.draining:
                self._registry.set_drain(view.info.name, intent.draining)

    async def sync(self) -> set[str]:
        changed = await self.refresh()
        self.apply()
        return changed
