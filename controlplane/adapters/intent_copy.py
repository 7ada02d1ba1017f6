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

**Both ways, by version.** At every load that succeeds the file and Redis are brought
together record by record (node by node), the later change winning (``intent.newer``: by
the records' versions; a node that one side lacks is newer on the other): a file record
that is newer than Redis's is copied into Redis (by compare-and-set against what the load
read, so a concurrent change in Redis is never overwritten by it) with one WARNING, and
the file takes Redis's records, but for those of its own that are newer. So:

* adding Redis to a control plane that ran without it copies its intent in (the first load
  wrote the empty Redis over the file, erasing every cordon made without Redis);
* a Redis that lost its data (restarted without persistence) gets every running replica's
  intent back at their next load, before the empty store is applied: the empty load lifted
  every cordon and stopped every engine deployed through the control plane, and the copies
  were overwritten with it, so nothing could bring the intent back (the copy into Redis
  used to run once, at a process's first load);
* a control plane without Redis that writes the same file while one with Redis runs (a
  rolling update adding Redis onto one volume) has its changes copied into Redis: they were
  never copied after the first load, and the next change in Redis rewrote the file without
  them, so the old process lifted its own cordon at its next load;
* a copy older than Redis's records (a replica that has not loaded since a change, the
  serving workers of one pod sharing the file, a file a pod kept from weeks ago) never
  overwrites them, in Redis or in the file.

Records are never deleted from the store, so a node absent from Redis means Redis never
held or lost its record, never that its intent was withdrawn (uncordon and undeploy write
records): deleting one in Redis by hand is undone by the replicas' copies. An unreadable
record is never copied into Redis, and one in Redis is never replaced by a copy: it stays
until the node's next change (``core.intent``); the file mirrors it like any other. Two
copies of one record changed apart (one in a file, one in Redis) keep the later one by the
clock.
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
        newer = await asyncio.to_thread(self._follow, records)
        if newer:
            await self._copy_in(newer, records)
            records = await self.inner.load()
            await asyncio.to_thread(self._follow, records)
        return records

    async def _copy_in(self, newer: dict[str, str], records: dict[str, str]) -> None:
        """Copy the file's records that are newer than Redis's into Redis (see the module
        docstring); a record Redis changed since ``records`` were read is left to it."""
        copied = [node for node, text in newer.items()
                  if await self.inner.compare_and_set(node, records.get(node), text)]
        if copied:
            log.warning("the operator intent kept in %s was newer than Redis's for %d "
                        "node(s) (%s): copied into Redis (a control plane moved to Redis, a "
                        "Redis that lost its data, or a control plane without Redis writing "
                        "the same file)", self.path, len(copied), ", ".join(sorted(copied)[:5]))

    async def get(self, node: str) -> str | None:
        return await self.inner.get(node)

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        return await self.inner.compare_and_set(node, expected, text)

    async def close(self) -> None:
        await self.inner.close()

    def _read(self) -> dict[str, str] | None:
        try:
            with intent_file.locked(self.path):
                return intent_file.read(self.path)
        except (OSError, intent_file.Damaged) as exc:
            log.error("cannot read the operator intent's copy %s: %s", self.path, exc)
            return None

    def _follow(self, records: dict[str, str]) -> dict[str, str]:
        """Under the file's lock, give the file every record of ``records`` (Redis's) that
        is newer than its own; returns the file's records that are newer than Redis's."""
        try:
            with intent_file.locked(self.path):
                if not self._started:
                    intent_file.remove_stale_temps(self.path)
                    self._started = True
                on_disk = self._on_disk()
                kept = on_disk or {}
                newer = {node: text for node, text in kept.items()
                         if intent.newer(text, records.get(node))}
                merged = {**records, **newer}
                if merged != on_disk:
                    intent_file.write(self.path, merged)
        except OSError as exc:
            if str(exc) != self._file_error:
                log.warning("cannot keep a copy of the operator intent in %s: %s",
                            self.path, exc)
            self._file_error = str(exc)
            return {}
        self._file_error = ""
        return newer

    def _on_disk(self) -> dict[str, str] | None:
        # A damaged file is kept aside (as without Redis) before the copy replaces it.
        if not self.path.exists():
            return None
        return intent_file.read_or_set_aside(self.path)
