"""Operator intent that must outlive a replica: cordons, drains and deployed engines.

The intent lives in an :class:`IntentStore` — Redis when ``redis.url`` is configured, so a
restarted or second replica honours it; ``<data_dir>/fleet_intent.json`` otherwise, so a
restart does (``adapters.intent_file``); :class:`MemoryIntentStore` serves tests — and is
applied to the registry by :meth:`FleetIntent.sync`, which the fleet service runs at start
and every second. Nodes that register later (or re-register) get their cordon within one sync,
and a cordon can be set for a node that is not connected yet.

Every change is a compare-and-set of one node's record: :meth:`FleetIntent.update` reads
the stored record, applies a pure change to it and writes it only if nobody wrote in
between (else reads again and re-applies). Two replicas cordoning and deploying onto the
same node at once therefore both land; a read-modify-write would drop one of them.

``desired`` is the complete set of control-plane-managed engines per node, keyed by
backend name, holding BackendSpec fields as plain data (JSON names); the fleet service
sends it to the node's agent as ``DesiredBackends`` whenever it changes.

**A record that is not a node's intent** (edited by hand in the file or in Redis, written
by a newer release) fails :meth:`NodeIntent.from_json` with :class:`BadRecord`. It must not
take the other nodes down with it (one bad record used to fail every sync, so no node's
cordon applied), nor be guessed at: :meth:`FleetIntent.refresh` leaves that node as this
process last applied it (as an unreachable store leaves the whole fleet) and logs one
ERROR naming the node, once per distinct bad text; the other nodes apply. The record is
left in the store, for whoever wants to mend it by hand, until the next change to that
node replaces it: :meth:`FleetIntent.update` then builds on what this process applied.
The one rule serves both stores (the file, Redis), so an adapter never parses a record.

**Versions.** Each record carries ``version``: the time it was written, in milliseconds, or
one more than the record it replaced when that is higher, so a node's versions only grow
(every write is a compare-and-set on the record before) and two writes of one node are two
different texts: a store record equal to the base a copy was changed from therefore means
the node is unchanged since (:func:`copy_goes_in`). Versions never decide between two
copies of a record: a replica's clock may run ahead, and an older release writes none (read
as 0), so "the later version wins" let a stale copy revert an operator's change. A copy
goes into the store by ancestry instead, :func:`copy_goes_in`. A change that changes
nothing is not written and keeps its version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from controlplane import errors
from controlplane.core import registry as registry_mod
from synapse_common import clock as clocks

log = logging.getLogger("synapse.controlplane.fleet")

MAX_ATTEMPTS = 64   # compare-and-set rounds before an update gives up (contention)


class BadRecord(ValueError):
    """A stored record that is not a node's intent."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeIntent:
    cordoned: bool = False
    draining: bool = False
    reason: str = ""
    desired: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # Makes every write of a node a new text, so a store record equal to a copy's base means
    # "unchanged since" (copy_goes_in); never compared (see the module docstring). Set by
    # FleetIntent.update at every write, never by a change. 0: an older release's record.
    version: int = 0

    def to_json(self) -> str:
        return json.dumps({"cordoned": self.cordoned, "draining": self.draining,
                           "reason": self.reason, "desired": dict(self.desired),
                           "version": self.version}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> NodeIntent:
        """The intent ``text`` holds (None or empty: no intent); :class:`BadRecord` for
        anything :meth:`to_json` does not write. Fields it does not know are ignored."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise BadRecord(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise BadRecord("not a JSON object")
        cordoned, draining = data.get("cordoned", False), data.get("draining", False)
        reason, desired = data.get("reason", ""), data.get("desired", {})
        if not isinstance(cordoned, bool) or not isinstance(draining, bool):
            raise BadRecord("cordoned and draining must be true or false")
        if not isinstance(reason, str):
            raise BadRecord("reason must be a string")
        if not isinstance(desired, dict) or not all(
                isinstance(spec, dict) for spec in desired.values()):
            raise BadRecord("desired must map engine names to objects")
        version = data.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise BadRecord("version must be a whole number, 0 or more")
        return cls(cordoned, draining, reason, desired, version)


def next_version(before: NodeIntent, wall_s: float) -> int:
    """The version of the record that replaces ``before``: the time in milliseconds, or
    one more than ``before``'s when that is higher (a clock behind another replica's)."""
    return max(before.version + 1, int(wall_s * 1000))


def copy_goes_in(copy: str | None, stored: str | None, base: str | None) -> bool:
    """Whether a copy's record of a node (``copy``, kept beside the store: the file each
    Redis replica keeps, ``adapters.intent_copy``) goes into the store, which holds
    ``stored`` (None: no record). ``base`` is the store's record the copy last followed.

    Only where the store has no record (it lost its data, or never had the node: records
    are never deleted), or still holds the base the copy was changed from (a control plane
    without the store wrote the copy since). Wherever the store changed since the copy
    followed it, the store's record is the later change, whatever either version says, and
    the copy follows it. An unreadable copy never goes in (see the module docstring)."""
    if copy is None or copy == stored or not (stored is None or stored == base):
        return False
    try:
        NodeIntent.from_json(copy)
    except BadRecord:
        return False
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One node's intent before and after an update."""

    before: NodeIntent
    after: NodeIntent


class IntentStore(Protocol):
    """Node name → intent as JSON text (adapters know nothing of NodeIntent)."""

    async def load(self) -> dict[str, str]: ...

    async def get(self, node: str) -> str | None: ...

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        """Write ``text`` only if the stored value is still ``expected`` (None: absent)."""
        ...

    async def close(self) -> None: ...


class MemoryIntentStore:
    def __init__(self) -> None:
        self._data: dict[str, str] = {}

    async def load(self) -> dict[str, str]:
        return dict(self._data)

    async def get(self, node: str) -> str | None:
        return self._data.get(node)

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        if self._data.get(node) != expected:
            return False
        self._data[node] = text
        return True

    async def close(self) -> None:
        pass


class FleetIntent:
    def __init__(self, store: IntentStore, registry: registry_mod.Registry, *,
                 wall: clocks.Clock = clocks.wall) -> None:
        self._store = store
        self._registry = registry
        self._wall = wall           # versions of the records this process writes
        self.intents: dict[str, NodeIntent] = {}
        self._updates = 0                       # updates this process finished (see refresh)
        self._updated_at: dict[str, int] = {}   # node -> self._updates at its latest update
        self._reported: dict[str, str] = {}     # node -> the bad record logged for it

    def get(self, node: str) -> NodeIntent:
        return self.intents.get(node, NodeIntent())

    async def update(self, node: str, change: Callable[[NodeIntent], NodeIntent]) -> Change:
        """Apply ``change`` to the node's stored intent atomically, then to the registry.

        ``change`` must be pure: it runs again on the fresh record when another writer got
        in first. Errors it raises (a plan that does not fit) propagate unchanged; a store
        that fails raises ``Unavailable``.
        """
        for _ in range(MAX_ATTEMPTS):
            try:
                stored = await self._store.get(node)
                before, bad = self._parse(node, stored)
                after = change(before)
                # Nothing to write (the change was already there): what was read is current;
                # a bad record is replaced all the same.
                if dataclasses.replace(after, version=before.version) == before and not bad:
                    after, written = before, True
                else:
                    after = dataclasses.replace(
                        after, version=next_version(before, self._wall()))
                    written = await self._store.compare_and_set(node, stored, after.to_json())
            except errors.SynapseError:
                raise
            except Exception as exc:
                raise errors.Unavailable("cannot store the change durably, so it was not "
                                         f"made: {exc}",
                                         code="intent_store_unavailable") from None
            if written:
                if bad:
                    log.warning("the stored intent of node %r was unreadable: replaced by "
                                "this change, made to the intent last applied", node)
                    self._reported.pop(node, None)
                self._updates += 1
                self._updated_at[node] = self._updates
                self.intents[node] = after
                self.apply()
                return Change(before, after)
        raise errors.Unavailable(f"the intent of node {node!r} kept changing under this "
                                 f"update ({MAX_ATTEMPTS} attempts); try again",
                                 code="intent_contention")

    async def set_fields(self, node: str, **fields: Any) -> Change:
        """Set some fields of the node's intent (atomically, like :meth:`update`)."""
        return await self.update(node, lambda i: dataclasses.replace(i, **fields))

    async def refresh(self) -> set[str]:
        """Reload from the store; returns nodes whose desired engines changed.

        A node that an update of this process settled while the load was under way keeps
        what the update settled: the load may have been read before it, and taking it would
        undo the update here (a cordon lifted, a deploy re-sent without its engine) until
        the next load. Only that node: every other node's record is taken, so an update
        (one that changed nothing included) never holds back another replica's change."""
        mark = self._updates
        records = await self._store.load()
        loaded = {node: self._parse(node, text)[0] for node, text in records.items()}
        for node, at in self._updated_at.items():
            if at > mark:
                loaded[node] = self.get(node)
        for node in set(self._reported) - set(records):
            del self._reported[node]
        changed = {n for n in set(loaded) | set(self.intents)
                   if loaded.get(n, NodeIntent()).desired != self.get(n).desired}
        self.intents = loaded
        return changed

    def _parse(self, node: str, text: str | None) -> tuple[NodeIntent, bool]:
        """The node's intent from its stored record, and whether the record was bad: a bad
        one stands for what this process applied last (see the module docstring)."""
        try:
            parsed = NodeIntent.from_json(text)
        except BadRecord as exc:
            if self._reported.get(node) != text:
                self._reported[node] = text or ""
                log.error("the stored intent of node %r is unreadable (%s): ignored, the "
                          "node keeps the intent applied before (none after a start); the "
                          "next cordon, drain or deploy on it replaces the record", node, exc)
            return self.get(node), True
        self._reported.pop(node, None)
        return parsed, False

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

    async def close(self) -> None:
        await self._store.close()
