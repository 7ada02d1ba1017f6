"""A local copy of the operator intent, for a start while its shared store is down.

The intent (cordons, drains, deployed engines: ``core.intent``) lives in Redis so that
every replica honours it. A replica keeps the last intent it loaded when Redis fails, but a
replica that starts while Redis is down has none: it served on cordoned and draining nodes
as if nobody had asked otherwise. :class:`CopiedIntentStore` wraps the shared store: every
load that succeeds is copied to ``<data_dir>/fleet_intent.json`` (when it changed), and the
first load of a process that fails returns that copy instead, once, with an error line
saying how old it is; later failures raise as before (the fleet keeps what it applied).

The file is the one a control plane without Redis keeps its intent in, written and read
by :mod:`controlplane.adapters.intent_file` (one format, written atomically, mode 0600,
under the same lock), so dropping Redis from the config starts from the last intent copied.

**Both ways, by ancestry.** At every load that succeeds the file and Redis are brought
together node by node (``intent.copy_goes_in``). Beside the file, ``fleet_intent.json.base``
holds, per node, the Redis record the file last followed (written under the same lock, by
every replica sharing the file). A file record goes into Redis (by compare-and-set against
what the load read, so a concurrent change in Redis is never overwritten by it; one
WARNING) only where Redis has no record of the node, or still holds that base while the
file's record differs from it; everywhere else Redis wins and the file follows it. So:

* adding Redis to a control plane that ran without it copies its intent in (the first load
  wrote the empty Redis over the file, erasing every cordon made without Redis);
* a Redis that lost its data (restarted without persistence) gets the intent back from the
  first replica that loads, before the empty store is applied: the empty load lifted every
  cordon and stopped every engine deployed through the control plane. A change made
  before that load (an uncordon right after the loss) starts from the file's record
  (:meth:`CopiedIntentStore.get` copies it in first), so it is written, not taken as
  already there, and never re-cordoned by the copy afterwards;
* a control plane without Redis that writes the same file while one with Redis runs (a
  rolling update adding Redis onto one volume) has its changes copied into Redis, as long
  as Redis did not change that node since: they were never copied after the first load;
* a copy older than Redis's record (a replica that has not loaded since a change, an older
  release's replica writing records without a version during a rolling upgrade, a replica
  whose clock runs ahead, a file a pod kept from weeks ago) never overwrites it, in Redis
  or in the file: versions are never compared (``core.intent``). (Merging by version let
  an older release's uncordon be reverted, and a fast clock's stale record win.)

After a data loss, copies that disagree are settled by which replica loads first; the
others follow it. Records are never deleted from the store, so a node absent from Redis
means Redis never held or lost its record, never that its intent was withdrawn (uncordon
and undeploy write records): deleting one in Redis by hand is undone by the replicas'
copies. An unreadable record is never copied into Redis; one in Redis stays until the
node's next change (``core.intent``); the file mirrors it like any other. A base file that
is missing or unreadable (the first load of this release) reads as no base: Redis wins
wherever it has a record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import time

from controlplane.adapters import intent_file
from controlplane.core import intent

log = logging.getLogger("synapse.controlplane.fleet")

FILE = intent_file.FILE


class CopiedIntentStore:
    def __init__(self, inner: intent.IntentStore, path: str | os.PathLike[str]) -> None:
        self.inner = inner
        self.path = pathlib.Path(path)
        self.base_path = self.path.with_name(f"{self.path.name}.base")   # see the docstring
        self._loaded = False                            # a load of this process succeeded
        self._started = False                           # stale temporary files removed
        self._file_error = ""                           # the last one logged

    async def load(self) -> dict[str, str]:
        try:
            records = await self.inner.load()
        except Exception:
            if self._loaded:
                raise
            self._loaded = True         # the copy is used once: later failures raise
            copy = await asyncio.to_thread(self._read)
            if copy is None:
                log.error("the operator intent (cordons, drains, deployed engines) is "
                          "unknown: its store is unreachable and no copy is kept in %s; "
                          "every node is served until it loads", self.path)
                raise
            age_s = time.time() - self.path.stat().st_mtime
            log.error("the operator intent's store is unreachable: applying the copy in %s, "
                      "%.0f s old, until it loads", self.path, age_s)
            return copy
        self._loaded = True
        copy_in = await asyncio.to_thread(self._follow, records)
        if copy_in:
            await self._copy_in(copy_in, records)
            records = await self.inner.load()
            await asyncio.to_thread(self._follow, records)
        return records

    async def _copy_in(self, copy_in: dict[str, str], records: dict[str, str]) -> None:
        """Copy the file's records that go into Redis (see the module docstring); a record
        Redis changed since ``records`` were read is left to it."""
        copied = [node for node, text in copy_in.items()
                  if await self.inner.compare_and_set(node, records.get(node), text)]
        self._copied(copied)

    def _copied(self, nodes: list[str]) -> None:
        if nodes:
            log.warning("the operator intent kept in %s held %d node(s) (%s) that Redis had "
                        "no record of or has not changed since: copied into Redis (a control "
                        "plane moved to Redis, a Redis that lost its data, or a control plane "
                        "without Redis writing the same file)",
                        self.path, len(nodes), ", ".join(sorted(nodes)[:5]))

    async def get(self, node: str) -> str | None:
        """Redis's record of the node; where Redis has none, the file's, copied in first, so
        an update starts from the intent every replica will load (an uncordon against a
        Redis that lost the cordon is written, not taken as already there)."""
        stored = await self.inner.get(node)
        if stored is not None:
            return stored
        copy = (await asyncio.to_thread(self._kept)).get(node)
        if copy is None or not intent.copy_goes_in(copy, None, None):
            return None
        if await self.inner.compare_and_set(node, None, copy):
            self._copied([node])
        return await self.inner.get(node)

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        return await self.inner.compare_and_set(node, expected, text)

    async def close(self) -> None:
        await self.inner.close()

    def _kept(self) -> dict[str, str]:
        """The file's records, or none when it cannot be read (an update is not refused for
        its copy: Redis holds the intent)."""
        try:
            with intent_file.locked(self.path):
                return intent_file.read(self.path) or {}
        except (OSError, intent_file.Damaged):
            return {}

    def _read(self) -> dict[str, str] | None:
        try:
            with intent_file.locked(self.path):
                return intent_file.read(self.path)
        except (OSError, intent_file.Damaged) as exc:
            log.error("cannot read the operator intent's copy %s: %s", self.path, exc)
            return None

    def _follow(self, records: dict[str, str]) -> dict[str, str]:
        """Under the file's lock, have the file follow ``records`` (Redis's) and note them
        as its base; returns the file's records that go into Redis instead."""
        try:
            with intent_file.locked(self.path):
                if not self._started:
                    intent_file.remove_stale_temps(self.path)
                    intent_file.remove_stale_temps(self.base_path)
                    self._started = True
                on_disk = self._on_disk()
                base = self._base()
                copy_in = {node: text for node, text in (on_disk or {}).items()
                           if intent.copy_goes_in(text, records.get(node), base.get(node))}
                merged = {**records, **copy_in}
                if merged != on_disk:
                    intent_file.write(self.path, merged)
                if records != base:     # after the file: a base never runs ahead of it
                    intent_file.write(self.base_path, records)
        except OSError as exc:
            if str(exc) != self._file_error:
                log.warning("cannot keep a copy of the operator intent in %s: %s",
                            self.path, exc)
            self._file_error = str(exc)
            return {}
        self._file_error = ""
        return copy_in

    def _base(self) -> dict[str, str]:
        # Missing or damaged: no base, so Redis wins wherever it has a record.
        try:
            return intent_file.read(self.base_path) or {}
        except intent_file.Damaged:
            return {}

    def _on_disk(self) -> dict[str, str] | None:
        # A damaged file is kept aside (as without Redis) before the copy replaces it.
        if not self.path.exists():
            return None
        return intent_file.read_or_set_aside(self.path)
