"""What backends' own ``/openapi.json`` say of ``cache_salt``, learnt at run time.

Two kinds of backend have no kind that says whether they take the tenant's salt
(:func:`controlplane.core.cache_salt.learns`): a static upstream without ``kind`` and an
agent's ``external`` backend (a URL the agent only probes). Each has its document read
by one bounded fetch (:func:`controlplane.adapters.prober.document`) and judged by one
rule (:func:`controlplane.core.cache_salt.offered`, off the event loop: the document is
the server's and may be large):

* a static upstream's by the prober (:mod:`controlplane.api.upstream_wiring`), after a
  healthy probe;
* an agent's external backend's by :class:`ExternalDocuments`, which looks at the
  registry every ``registry.upstream_probe_interval_s``: a routable one whose document
  was not read at the URL its agent reports now is read (beside the look, one fetch per
  backend at a time). The control plane sends such a backend tenants' requests itself,
  at that URL (agents report URLs, they relay no request), so it reads the document
  there too rather than asking the agent to: no field on the wire, and nothing an agent
  says that a document would not. A backend that stops being routable (unhealthy, its
  node down) is read again once it is back, one whose URL changed at once: another
  server may answer there now. An answer that says nothing for certain (a 5xx, a
  time-out) is asked again at the next look.

A backend whose document is to be read again counts as unsalted until a read answers
for certain (:meth:`Learner.unread`): what an earlier read said may be another server's,
and a re-read that never answers (a redirect, a server that sends its headers a byte at
a time) must not keep it for good, sending the salt and showing the counts of a server
that may share one prefix cache among tenants.

Either way :class:`Learner` tells the registry (salted from then on, or, when tenants
share its prefix cache, its counts hidden) and the log says it once per change, and once
per pod: a serving worker (``http.workers``) learns for itself, since it routes for
itself, and leaves the saying to the pod's primary. Until its document is read a
backend counts as unsalted: an agent's is marked as shared from its first report
(:mod:`controlplane.api.grpc_server`), so its counts are hidden from the start; one whose
document never answers for certain (a ``401``) stays so, unwarned, like a static one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging

import orjson

from controlplane.adapters import prober
from controlplane.api import services as services_mod
from controlplane.core import cache_salt, types
from synapse_common import clock as clocks

log = logging.getLogger("synapse.controlplane.upstreams")


class Learner:
    """What documents said: the registry is told each time, the log only when it changed
    (and only on the pod's primary)."""

    def __init__(self, svc: services_mod.Services) -> None:
        self._svc = svc
        self._said: dict[str, bool] = {}

    async def learnt(self, key: str, status: int, body: bytes) -> None:
        """A kind-less static upstream's ``/openapi.json`` answered (the prober's
        ``on_document``)."""
        backend = next((b for b in self._svc.registry.static_backends() if b.key == key),
                       None)
        if backend is not None:
            await self.read(backend, status, body)

    async def read(self, backend: types.BackendState, status: int, body: bytes) -> None:
        """``backend``'s document answered ``status`` with ``body`` (a 200, else it has
        none): salt it if it takes the field, else warn when tenants share its prefix
        cache."""
        svc = self._svc
        takes = status == 200 and await asyncio.to_thread(_offers, body)
        unsalted = dataclasses.replace(backend, takes_salt=False)
        names = self._mark(unsalted, takes)
        if self._said.get(backend.key) == takes:
            return
        self._said[backend.key] = takes
        if takes:
            log.log(logging.INFO if svc.primary else logging.DEBUG,
                    "%s takes cache_salt (its /openapi.json): its prefix cache is "
                    "partitioned per tenant", _printable(_named(backend)))
        elif names:
            log.log(logging.WARNING if svc.primary else logging.DEBUG, "%s",
                    _printable(cache_salt.warning(unsalted, names)))

    def unread(self, backend: types.BackendState) -> None:
        """``backend``'s document is to be read again (it came back, or is at another
        URL): unsalted, its counts hidden when tenants share it, until a read answers
        for certain. Not logged: nothing was learnt."""
        self._mark(dataclasses.replace(backend, takes_salt=False), False)

    def unread_static(self, key: str) -> None:
        """:meth:`unread` for a kind-less static upstream (the prober's ``on_due``)."""
        backend = next((b for b in self._svc.registry.static_backends() if b.key == key),
                       None)
        if backend is not None:
            self.unread(backend)

    def _mark(self, unsalted: types.BackendState, takes: bool) -> tuple[str, ...]:
        """Tell the registry whether the backend (``unsalted``: as if it took no salt)
        ``takes`` the salt; the tenants that share its prefix cache when it does not."""
        names = cache_salt.sharing(unsalted, self._svc.sharers())
        registry = self._svc.registry
        if unsalted.source == "static":
            registry.set_static_salted(unsalted.key, takes, bool(names))
        else:
            registry.set_agent_salted(unsalted.node, unsalted.name, unsalted.url, takes,
                                      bool(names))
        return names

    def forget(self, key: str) -> None:
        """``key`` is gone (an agent's backend no longer reported): said afresh if it
        comes back."""
        self._said.pop(key, None)


class ExternalDocuments:
    """Agents' external backends' documents, read as the module docstring says."""

    def __init__(self, svc: services_mod.Services, learner: Learner, *,
                 sleep: clocks.Sleep = clocks.sleep) -> None:
        self._svc = svc
        self._learner = learner
        self._sleep = sleep
        self._read: dict[str, str] = {}     # backend key -> the URL its document was read at
        self._told: set[str] = set()        # backend keys the learner was told of
        self._fetching: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        try:
            while True:
                self.look()
                await self._sleep(self._svc.settings.registry.upstream_probe_interval_s)
        finally:
            for task in self._fetching.values():
                task.cancel()

    def look(self) -> None:
        """Start a read for each routable external backend not read at its URL; forget
        what was read of backends gone or not routable."""
        present: set[str] = set()
        for b, why in self._svc.registry.all_backends():
            if b.source != "agent" or not cache_salt.learns(b):
                continue
            present.add(b.key)
            if why:
                if self._read.pop(b.key, None) is not None:
                    self._learner.unread(b)     # read again once it is back
            elif self._read.get(b.key) != b.url and b.key not in self._fetching:
                self._learner.unread(b)
                task = self._fetching[b.key] = asyncio.create_task(self._fetch(b))
                task.add_done_callback(functools.partial(self._fetched, b.key))
        for key in [k for k in self._read if k not in present]:
            del self._read[key]
        for key in self._told - present:
            self._told.discard(key)
            self._learner.forget(key)

    def _fetched(self, key: str, task: asyncio.Task[None]) -> None:
        self._fetching.pop(key, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("reading the /openapi.json of %s failed: %r", _printable(key), exc)

    async def _fetch(self, backend: types.BackendState) -> None:
        answer = await prober.document(self._svc.upstream, backend.url + "/openapi.json", {})
        if answer is None:
            return          # nothing certain: asked again at the next look
        self._read[backend.key] = backend.url
        self._told.add(backend.key)
        await self._learner.read(backend, *answer)


def _named(backend: types.BackendState) -> str:
    if backend.source == "static":
        return f"upstream {backend.key}"
    return f"backend {backend.name} of node {backend.node}"


def _printable(text: str) -> str:
    """``text`` with controls replaced: an agent's backend names are the agent's."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _offers(body: bytes) -> bool:
    try:
        return cache_salt.offered(orjson.loads(body))
    except orjson.JSONDecodeError:
        return False
