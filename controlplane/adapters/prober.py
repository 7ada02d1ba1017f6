"""Health probing of static upstreams (a real Ollama / vLLM / TGI / hosted API, no agent).

Each :class:`Target` says what to fetch (its kind's probe path, with the key only when
that path needs it), which statuses are healthy besides 2xx, and how often: targets are
probed on their own schedules (a hosted API once a minute, engines every few seconds),
each with a short time limit; a refused connection or a time-out is unhealthy. Only a
probe's status counts (any 2xx, a 204 too; a redirect is never followed), and of its body
a few bytes at most are read, so a backend's health path cannot make the control plane
hold what it sends. A target
with a ``metrics_url`` has its metrics text fetched after a healthy probe, for the
caller to read with the kind's names. A healthy target turns unhealthy after
``fail_after`` failed probes in a row (the first probe decides at once). Results go to
callbacks (the registry); only the transitions are logged, with the URL (never the headers: they may hold the key).
``on_round`` is called once, after the first round (every target probed once). A target
with a ``document_url`` (a kind-less upstream's ``/openapi.json``) has it fetched after a
healthy probe until it answers for certain, and that answer goes to ``on_document``: a
200 (the document, at most :data:`read_limits.OPENAPI_MAX_BYTES` read from the connection; a longer
one is given as empty), or a 404 or 405 (the server has none). Any other status or no
answer (a proxy warming up, a time-out) is asked again after the next healthy probe, as
a server that said nothing for certain may take the field after all. It is read again
whenever the target turns healthy after being unhealthy: another server may answer at
its URL now, so ``on_due`` is told before that probe's result is reported (what was
learnt no longer holds until a read answers for certain). The first round waits for
those fetches, so what the server is is learnt before ``/ready`` says the replica is;
later ones run beside the schedule (vLLM builds
the document on its first request, hence a time limit of its own, which must not hold
up other probes). :func:`document` is that read alone, which an agent's ``external``
backend's document gets too (:mod:`controlplane.api.salt_learning`).

Time is injected (``clock``, ``sleep``: :mod:`synapse_common.clock`), so tests run the
schedule without waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from controlplane import errors
from synapse_common import clock as clocks
from synapse_common import read_limits

log = logging.getLogger("synapse.controlplane.prober")

DOCUMENT_TIMEOUT_S = 15.0
DOCUMENT_STATUSES = frozenset({200, 404, 405})  # answers that say what the server has
PROBE_BODY_BYTES = 4096     # of a health answer's body: read, then dropped


class _Answer(Protocol):
    @property
    def status(self) -> int: ...

    async def next_chunk(self, timeout_s: float | None = None) -> bytes | None: ...

    def close(self) -> None: ...


class Sender(Protocol):
    """What the prober needs of a transport (:class:`~controlplane.adapters.upstream.UpstreamClient`)."""

    async def send(self, method: str, url: str, body: bytes, headers: Mapping[str, str],
                   timeout_s: float | None = None) -> _Answer: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    key: str                                    # the backend key (static/name)
    url: str                                    # probed with GET
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    interval_s: float = 5.0
    timeout_s: float = 2.0
    ok_statuses: frozenset[int] = frozenset()   # healthy besides 2xx
    metrics_url: str | None = None
    metrics_headers: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    fail_after: int = 2             # failed probes in a row that make it unhealthy
    document_url: str | None = None     # fetched once it answers (after a healthy probe)


async def _get(client: Sender, url: str, headers: Mapping[str, str], timeout_s: float,
               limit: int) -> tuple[int, bytes] | None:
    """The status and body of a GET (None: no answer in time); no more than ``limit`` + 1
    bytes of the body are read (more than ``limit``: too long). Never the whole body: a
    backend's answer to a probe is its own to size, and what is read arrives as pieces,
    outside what whole answers may hold (:data:`controlplane.adapters.http1.BUDGET`)."""
    try:
        async with asyncio.timeout(timeout_s):
            resp = await client.send("GET", url, b"", headers, timeout_s)
            try:
                return resp.status, await _read_at_most(resp, limit + 1)
            finally:
                resp.close()
    except (errors.UpstreamError, errors.UpstreamTimeout, TimeoutError):
        return None


async def _read_at_most(resp: _Answer, limit: int) -> bytes:
    """The body, or its first bytes once ``limit`` of them arrived (the rest is left on
    the connection, which closing then drops)."""
    parts: list[bytes] = []
    size = 0
    while size < limit and (chunk := await resp.next_chunk()) is not None:
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:limit]


async def document(client: Sender, url: str, headers: Mapping[str, str],
                   ) -> tuple[int, bytes] | None:
    """A server's ``/openapi.json`` at ``url`` as it answered for certain: its status
    (:data:`DOCUMENT_STATUSES`) and body, a body over :data:`read_limits.OPENAPI_MAX_BYTES` given as
    empty; None when it said nothing for certain (another status, no answer in time)."""
    answer = await _get(client, url, headers, DOCUMENT_TIMEOUT_S, read_limits.OPENAPI_MAX_BYTES)
    if answer is None or answer[0] not in DOCUMENT_STATUSES:
        return None
    status, body = answer
    return status, body if len(body) <= read_limits.OPENAPI_MAX_BYTES else b""


async def probe(client: Sender, target: Target) -> bool:
    """Whether ``target`` answered a healthy status. Only the status counts: a few bytes of
    the body are read (so a short answer leaves its connection to reuse), never more."""
    answer = await _get(client, target.url, target.headers, target.timeout_s,
                        PROBE_BODY_BYTES)
    if answer is None:
        return False
    status = answer[0]
    return 200 <= status < 300 or status in target.ok_statuses


async def metrics_text(client: Sender, target: Target) -> str | None:
    """The target's metrics exposition, or None when it could not be fetched."""
    if target.metrics_url is None:
        return None
    answer = await _get(client, target.metrics_url, target.metrics_headers, target.timeout_s,
                        read_limits.METRICS_MAX_BYTES)
    if answer is None or answer[0] != 200 or len(answer[1]) > read_limits.METRICS_MAX_BYTES:
        return None
    return answer[1].decode("utf-8", "replace")


@dataclasses.dataclass(eq=False)
class Prober:
    """The schedule: every target when due, transitions logged, results reported."""

    client: Sender
    targets: Sequence[Target]
    report: Callable[[str, bool], None]
    _: dataclasses.KW_ONLY
    on_metrics: Callable[[str, str | None], None] | None = None
    on_round: Callable[[], None] | None = None
    on_document: Callable[[str, int, bytes], Awaitable[None]] | None = None
    on_due: Callable[[str], None] | None = None     # its document is to be read again
    clock: clocks.Clock = clocks.monotonic
    sleep: clocks.Sleep = clocks.sleep
    _last: dict[str, bool] = dataclasses.field(default_factory=dict, init=False)
    _failures: dict[str, int] = dataclasses.field(default_factory=dict, init=False)
    _documents: set[str] = dataclasses.field(default_factory=set, init=False)   # read
    _fetching: dict[str, asyncio.Task[None]] = dataclasses.field(default_factory=dict,
                                                                 init=False)
    _due: dict[str, float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        self._due = {t.key: 0.0 for t in self.targets}

    async def run(self) -> None:
        if not self.targets:
            return
        first = True
        try:
            while True:
                now = self.clock()
                due = [t for t in self.targets if self._due[t.key] <= now]
                await asyncio.gather(*(self._check(t, now) for t in due))
                if first:
                    await asyncio.gather(*self._fetching.values(), return_exceptions=True)
                    if self.on_round is not None:
                        self.on_round()
                first = False
                await self.sleep(max(0.0, min(self._due.values()) - self.clock()))
        finally:
            for task in self._fetching.values():
                task.cancel()

    async def _check(self, target: Target, now: float) -> None:
        self._due[target.key] = now + target.interval_s
        ok = await probe(self.client, target)
        failures = self._failures[target.key] = 0 if ok else self._failures.get(target.key, 0) + 1
        # The first probe decides; after it, one lost probe (a busy machine, a dropped
        # packet) does not take a healthy upstream out of routing.
        healthy = ok or (target.key in self._last and self._last[target.key]
                         and failures < target.fail_after)
        if (healthy and self._last.get(target.key) is False
                and target.document_url is not None):
            self._documents.discard(target.key)     # back: maybe another server now
            if self.on_due is not None:
                self.on_due(target.key)
        if self._last.get(target.key) != healthy:
            log.log(logging.INFO if healthy else logging.WARNING, "upstream %s is %s (%s)",
                    target.key, "healthy" if healthy else "unhealthy", target.url)
        self._last[target.key] = healthy
        self.report(target.key, healthy)
        if healthy and self.on_metrics is not None and target.metrics_url is not None:
            self.on_metrics(target.key, await metrics_text(self.client, target))
        if (healthy and target.document_url is not None and target.key not in self._documents
                and target.key not in self._fetching):
            task = self._fetching[target.key] = asyncio.create_task(self._document(target))
            task.add_done_callback(lambda _: self._fetching.pop(target.key, None))

    async def _document(self, target: Target) -> None:
        assert target.document_url is not None
        answer = await document(self.client, target.document_url, target.headers)
        if answer is None:
            return          # nothing certain: asked again after the next healthy probe
        self._documents.add(target.key)
        if self.on_document is not None:
            await self.on_document(target.key, *answer)
