"""A local copy of the operator intent, for a start while its shared store is down.

The intent (cordons, drains, deployed engines: ``core.intent``) lives in Redis so that
every replica honours it. A replica keeps the last intent it loaded when Redis fails, but a
replica that starts while Redis is down has none: it served on cordoned and draining nodes
as if nobody had asked otherwise. :class:`CopiedIntentStore` wraps the shared store: every
load that succeeds is copied to ``<data_dir>/fleet_intent.json`` (when it changed), and the
first load of a process that fails returns that copy instead, once, with an error line
saying how old it is; later failures raise as before (the fleet keeps what it applied).

The file is the one a control plane without Redis keeps its intent in, written and read
by :mod:`controlplane.adapters.intent_file` (one format, written atomically, mode 0600), so
dropping Redis from the config starts from the last intent copied.
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

    async def load(self) -> dict[str, str]:
        try:
            records = await self.inner.load()
        except Exception:
            if self._loaded:
                raise
            self._loaded = True         # the copy is used once: later failures raise
            copy = self._read()
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
        if records != self._copied:
            await asyncio.to_thread(self._write, records)
        return records

    async def get(self, node: str) -> str | None:
        return await self.inner.get(node)

    async def compare_and_set(self, node: str, expected: str | None, text: str) -> bool:
        return await self.inner.compare_and_set(node, expected, text)

    async def close(self) -> None:
        await self.inner.close()

    def _read(self) -> dict[str, str] | None:
        try:
            return intent_file.read(self.path)
        except (OSError, intent_file.Damaged) as exc:
            log.error("cannot read the operator intent's copy %s: %s", self.path, exc)
            return None

    def _write(self, records: dict[str, str]) -> None:
        try:
            intent_file.write(self.path, records)
        except OSError as exc:
            log.warning("cannot keep a copy of the operator intent in %s: %s", self.path, exc)
            return
        self._copied = dict(records)
