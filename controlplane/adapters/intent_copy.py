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

**Adding Redis.** The other direction runs through the file too. When the first load of a
process that succeeds finds Redis holding no intent at all while the file holds some (a
control plane that ran without Redis, or a Redis that lost its data), the file's records
are copied into Redis, each by compare-and-set against an absent record, so a replica that
wrote first keeps its record, and one WARNING says so. Copying the empty Redis over the
file instead erased every cordon made without Redis. Once Redis holds intent it is the
source and the file follows it. Records are never deleted from the store, so an empty
Redis never means "no node has intent any more". A seeding cut short by a Redis failure
goes on at the next load.
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
        self._copied: dict[str, str] | None = None     # what the file holds
        self._loaded = False                            # a load of this process succeeded
        self._seeded = False        # Redis was checked for intent to seed from the file
        self._to_seed: dict[str, str] = {}              # file records not yet copied

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
        if not self._seeded:
            if not records:
                self._to_seed = await asyncio.to_thread(self._file_records)
            self._seeded = True
        if self._to_seed:
            records = await self._seed()
        if records != self._copied:
            await asyncio.to_thread(self._write, records)
        return records

    async def _seed(self) -> dict[str, str]:
        """Copy the file's records into the empty Redis (see the module docstring); the
        records Redis holds then."""
        count = len(self._to_seed)
        for node, text in list(self._to_seed.items()):
            await self.inner.compare_and_set(node, None, text)     # False: a replica wrote
            del self._to_seed[node]
        log.warning("the operator intent's store (Redis) held no intent: copied the %d "
                    "nodes' intent kept in %s into it (a control plane moved to Redis, or a "
                    "Redis that lost its data)", count, self.path)
        return await self.inner.load()

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

    def _file_records(self) -> dict[str, str]:
        # A damaged file is kept aside (as without Redis) before the copy replaces it.
        try:
            with intent_file.locked(self.path):
                return intent_file.read_or_set_aside(self.path)
        except OSError as exc:
            log.error("cannot read %s for intent to copy into Redis: %s", self.path, exc)
            return {}

    def _write(self, records: dict[str, str]) -> None:
        try:
            with intent_file.locked(self.path):
                if self._copied is None:
                    intent_file.remove_stale_temps(self.path)
                intent_file.write(self.path, records)
        except OSError as exc:
            log.warning("cannot keep a copy of the operator intent in %s: %s", self.path, exc)
            return
        self._copied = dict(records)
