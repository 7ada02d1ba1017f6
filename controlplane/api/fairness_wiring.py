"""Fairness (issue 18) built from the settings and attached to the app.

:func:`build` makes the one :class:`controlplane.core.fairness.Fairness` of a process
(policies from ``auth.tenants`` and ``auth.key_file``, the price table, the usage book,
the fair queue and its ``room`` rule over the router's predictions); :func:`install`
attaches it to the services (``svc.fairness``) and adds the cleanup context that, when
``redis.url`` is set, moves token limits and usage to Redis (shared by every replica),
without Redis keeps usage and the budgets' spend in ``data_dir`` (``usage.sqlite``, written
by the usage flush loop, restored at start-up: :mod:`controlplane.adapters.usage_db`),
runs the usage flush loop and stops the queue's pumps. While the usage store fails, each
flush also keeps what it could not store in this process's spool file in ``data_dir``
(:class:`usage_journal.Spool`), so a hard kill during an outage loses only what was
recorded since the last flush; a clean stop writes its own file and removes the spool,
and the next start takes both back (:func:`_restore`). The coalescer sits beside the
response cache (``fairness.coalesce``). Metrics (``synapse_tokens_total``, the queue's
depth and wait, coalescing) are recorded through the small observers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import web

from controlplane import config
from controlplane.adapters import (
    redis_limits,
    redis_tokens,
    redis_usage,
    usage_db,
    usage_journal,
)
from controlplane.api import context
from controlplane.api import services as services_mod
from controlplane.core import (
    cache_feedback,
    coalesce,
    fair_queue,
    fairness,
    pricing,
    saturation,
    token_limits,
    usage_book,
)
from controlplane.core import router as router_mod
from synapse_common import clock as clocks

log = logging.getLogger("synapse.controlplane.fairness")
USAGE_STORE_TIMEOUT_S = 2.0     # flushes and reads are off the serving path
_FLUSHER: web.AppKey[asyncio.Task[None]] = web.AppKey("usage_flusher", asyncio.Task)


def get(svc: services_mod.Services) -> fairness.Fairness:
    """The process's fairness object (built on first use when :func:`install` was not
    called, e.g. a gRPC-only test)."""
    if svc.fairness is None:
        svc.fairness = build(svc)
    return svc.fairness


# -- building ---------------------------------------------------------------------------


def build(svc: services_mod.Services) -> fairness.Fairness:
    """From ``svc.settings``; ValueError naming the field for a bad key-file tenant."""
    s = svc.settings.fairness
    tenants = services_mod._tenant_settings(svc.settings.auth)   # the key file's too
    for i, t in enumerate(tenants):
        if t.priority not in s.queue.classes:
            raise ValueError(f"auth tenant {t.name!r} (#{i}): priority {t.priority!r} is not "
                             f"one of fairness.queue.classes {s.queue.classes}")
    canonical = svc.catalog.canonical
    prices = pricing.PriceTable({canonical(m): pricing.Price(
        p.prompt_per_million, p.completion_per_million, p.cached_prompt_per_million)
        for m, p in s.prices.items()})
    book = (usage_book.UsageBook(usage_book.MemoryUsageStore(s.usage.retention_days))
            if s.usage.enabled else None)
    q = s.queue
    gate = saturated = None
    if q.enabled:
        saturated = saturation.Saturation(svc.router.ledger, q.max_queue_wait_s,
                                          q.reserved_seats, seats_metric(svc))
        gate = fair_queue.Gate(
            fair_queue.Options(tuple(q.classes), q.max_waiting, q.max_waiting_per_tenant,
                               q.deadline_s, q.poll_interval_s, q.max_seat_hold_s),
            room(svc.router, saturated, q.classes[0]), observer=QueueMetrics(svc))
    coalesced = svc.metrics.coalesced
    judged = svc.cache if isinstance(svc.cache, cache_feedback.FeedbackCache) else None
    coalescer = (coalesce.Coalescer(on_follow=lambda outcome: coalesced.labels(outcome).inc(),
                                    tenants=services_mod.tenant_count(svc.tenants),
                                    on_served=judged.remember if judged else None)
                 if s.coalesce else None)
    tiered = services_mod.tiered_cache(svc.cache)
    if coalescer is not None and tiered is not None:   # its landed copies answer from it
        tiered.invalidation_listeners.append(coalescer.forget_landed)
    if coalescer is not None and judged is not None:   # nor once a verdict evicted it
        judged.eviction_listeners.append(coalescer.forget_landed)
    return fairness.Fairness(
        policies(tenants, canonical),
        token_limits.TokenLimiter(token_limits.LocalTokenStore(svc.clock)), prices, book, gate,
        fairness.Options(s.default_completion_tokens), TokenMetrics(svc), coalescer,
        saturated)


def policies(tenants: Sequence[config.TenantSettings],
             canonical: Callable[[str], str]) -> dict[str, fairness.TenantPolicy]:
    out = {}
    for t in tenants:
        models = {}
        for name, limits in t.models.items():
            rule = _rule(t.name, canonical(name), limits.tokens_per_minute, limits.budget)
            if rule is not None:
                models[rule.model] = rule
        out[t.name] = fairness.TenantPolicy(
            _rule(t.name, "", t.tokens_per_minute, t.budget), models, t.priority, t.weight,
            t.priority_header)
    return out


def _rule(tenant: str, model: str, tpm: int | None,
          budget: config.BudgetSettings | None) -> token_limits.ScopeRule | None:
    b = None
    if budget is not None:
        b = (token_limits.Budget(budget.period, float(budget.tokens), "tokens")
             if budget.tokens is not None
             else token_limits.Budget(budget.period, float(budget.cost or 0.0), "cost"))
    if tpm is None and b is None:
        return None
    return token_limits.ScopeRule(tenant, model, tpm, b)


def room(router: router_mod.Router, saturated: saturation.Saturation,
         top: str) -> Callable[[str, str, int], bool]:
    """Whether some backend of a model is not saturated for a request of a class (``top``
    is the highest) taking so many seats (the router's own predictions, without moving
    any of its state)."""
    probe = router_mod.Prompt.from_text("", 0, "", exact=False)

    def has_room(model: str, cls: str, sequences: int = 1) -> bool:
        verdicts, _ = router.verdicts(model, probe)
        if not verdicts:
            return True     # nothing serves it: let dispatch answer 503 at once
        return saturated.room(verdicts, cls == top, sequences)
    return has_room


# -- metrics ----------------------------------------------------------------------------


class TokenMetrics(fairness.TokenObserver):
    def __init__(self, svc: services_mod.Services) -> None:
        self._svc = svc

    def tokens(self, tenant: str, model: str, kind: str, count: int) -> None:
        self._svc.child(self._svc.metrics.tokens, tenant, model, kind).inc(count)


def seats_metric(svc: services_mod.Services) -> Callable[[str, int | None], None]:
    """The learned seat limit per backend as a gauge (removed when a restart forgets it)."""
    gauge = svc.metrics.queue_seats

    def record(backend: str, seats: int | None) -> None:
        if seats is None:
            with contextlib.suppress(KeyError):
                gauge.remove(backend)
        else:
            gauge.labels(backend).set(seats)     # rare: no memoised child to outlive remove
    return record


class QueueMetrics:
    """Depth per class and tenant (summed over models) and time waited."""

    def __init__(self, svc: services_mod.Services) -> None:
        self._svc = svc
        self._depths: dict[tuple[str, str, str], int] = {}

    def depth(self, model: str, cls: str, tenant: str, waiting: int) -> None:
        self._depths[(model, cls, tenant)] = waiting
        total = sum(n for (_, c, t), n in self._depths.items() if c == cls and t == tenant)
        if not waiting:
            del self._depths[(model, cls, tenant)]
        self._svc.child(self._svc.metrics.queue_depth, cls, tenant).set(total)

    def waited(self, cls: str, tenant: str, seconds: float, outcome: str) -> None:
        self._svc.child(self._svc.metrics.queue_wait, cls, tenant, outcome).observe(seconds)


# -- the app ----------------------------------------------------------------------------


def install(app: web.Application, svc: services_mod.Services) -> None:
    """Build (at start-up, so a bad setting stops the process) and add the cleanup
    context."""
    get(svc)
    app.cleanup_ctx.append(_ctx)


async def _ctx(app: web.Application) -> AsyncIterator[None]:
    svc = app[context.SERVICES]
    fair = get(svc)
    client = _use_redis(svc, fair)
    disk = _use_disk(svc, fair) if client is None else None
    carried = _restore(svc, fair.book) if fair.book is not None else None
    spool = usage_journal.Spool(_journal(svc)) if fair.book is not None else None
    failures = FlushFailures(svc.clock)
    if fair.book is not None or disk is not None:
        wake = None
        if disk is not None:    # a budget just spent is written at once, not a round later
            wake = asyncio.Event()
            fair.limiter.local.on_budget_spent = wake.set
        app[_FLUSHER] = asyncio.get_running_loop().create_task(_flush_loop(
            svc, fair, disk, svc.settings.fairness.usage.flush_interval_s, wake, failures,
            carried, spool))
    yield
    if _FLUSHER in app:
        app[_FLUSHER].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app[_FLUSHER]
        await _flush(svc, fair, disk, failures, carried, spool)    # pending, once more
        if fair.book is not None:
            _keep(svc, fair.book, carried, spool)
    if carried is not None:
        carried.release()
    if spool is not None:
        spool.release()
    if disk is not None:
        disk.close()
    if fair.gate is not None:
        await fair.gate.close()
    if fair.coalescer is not None:
        fair.coalescer.close()
    if client is not None:
        await client.aclose()


def _use_redis(svc: services_mod.Services, fair: fairness.Fairness) -> Any:
    url = svc.settings.redis.url
    if url is None:
        return None
    client = redis_limits.connect(url.get_secret_value())

    def on_error(exc: Exception) -> None:
        svc.metrics.redis_errors.labels("token_limits").inc()
        log.debug("redis token limit call failed: %s", exc)

    local = token_limits.LocalTokenStore(svc.clock)
    fair.limiter = token_limits.TokenLimiter(
        local, redis_tokens.RedisTokenStore(client, svc.settings.redis.timeout_s), on_error)
    if fair.book is not None:
        fair.book.store = redis_usage.RedisUsageStore(
            client, max(USAGE_STORE_TIMEOUT_S, svc.settings.redis.timeout_s),
            svc.settings.fairness.usage.retention_days)
    return client


def _use_disk(svc: services_mod.Services, fair: fairness.Fairness) -> usage_db.UsageDb | None:
    """Without Redis: usage and the budgets' spend in ``data_dir``, the spends of an
    earlier run restored (None when the file cannot be used: memory only, one warning)."""
    db = usage_db.UsageDb(os.path.join(svc.settings.data_dir, usage_db.FILE),
                          svc.settings.fairness.usage.retention_days)
    try:
        spends = db.open_now(clocks.wall())
    except Exception as exc:
        log.warning("usage file %s could not be used (%s: %s): usage and budget spend are "
                    "kept in memory only this run (a restart resets them)", db.path,
                    type(exc).__name__, exc)
        db.close()
        return None
    fair.limiter.local.restore_spends(spends, clocks.wall())
    if fair.book is not None:
        fair.book.store = db
    return db


async def _flush_loop(svc: services_mod.Services, fair: fairness.Fairness,
                      disk: usage_db.UsageDb | None, interval_s: float,
                      wake: asyncio.Event | None = None,
                      failures: FlushFailures | None = None,
                      carried: usage_journal.Carried | None = None,
                      spool: usage_journal.Spool | None = None) -> None:
    while True:
        await _pause(interval_s, wake)
        await _flush(svc, fair, disk, failures, carried, spool)


async def _pause(interval_s: float, wake: asyncio.Event | None) -> None:
    """``interval_s``, or until ``wake`` is set (then cleared) if that comes first."""
    await clocks.sleep(interval_s, wake)
    if wake is not None:
        wake.clear()


def _journal(svc: services_mod.Services) -> str:
    return os.path.join(svc.settings.data_dir, usage_journal.FILE)


def _restore(svc: services_mod.Services,
             book: usage_book.UsageBook) -> usage_journal.Carried | None:
    """Take back the usage an earlier run could not store when it stopped, sent first by
    its batch ids; its files stay (held by this process) until a flush has stored it
    (:mod:`usage_journal`)."""
    path = _journal(svc)
    try:
        carried = usage_journal.take(path)
    except OSError as exc:
        log.error("cannot read the usage kept by an earlier run in %s: %s", path, exc)
        return None
    if carried.unreadable:
        log.error("%d unreadable line(s), batch(es), row(s) or value(s) of usage kept by "
                  "an earlier run in %s were lost", carried.unreadable, path)
    if carried.batches:
        book.restore(carried.batches)
        log.warning("%d usage row(s) an earlier run could not store were taken back from %s",
                    sum(len(b.rows) for b in carried.batches), path)
    return carried


def _keep(svc: services_mod.Services, book: usage_book.UsageBook,
          carried: usage_journal.Carried | None = None,
          spool: usage_journal.Spool | None = None) -> None:
    """At a stop, keep on disk, with their batch ids, what the store could not take (its
    last flush failed); the files taken at start and this process's spool go once their
    batches are in the new one (never before). Never raises: a file that cannot be
    written or deleted is logged."""
    batches = book.batches()
    if not batches:
        if carried is not None:
            carried.done()
        _drop_spool(spool)
        return
    path = _journal(svc)
    rows = sum(len(b.rows) for b in batches)
    try:
        kept = usage_journal.keep(path, batches)
    except OSError as exc:
        if carried is not None:
            carried.release()   # the batches taken at start stay for the next start
        if spool is not None:
            spool.release()     # and those spooled while the store failed
        log.error("%d usage row(s) could not be stored: the usage store failed and %s "
                  "could not be written (%s); those recorded since the spool file was "
                  "last written are lost", rows, path, exc)
        return
    if carried is not None:
        carried.done()
    _drop_spool(spool)
    log.error("%d usage row(s) could not be stored (the usage store failed); kept in %s "
              "and added at the next start", rows, kept)


async def _spool(book: usage_book.UsageBook, carried: usage_journal.Carried | None,
                 spool: usage_journal.Spool, warn: FlushFailures) -> None:
    """After a flush: while a batch is not stored (the store fails), keep on disk in this
    process's spool what is neither stored nor in a file taken at start, so a hard kill
    loses only what was recorded since this flush, and tell the book which version of
    the pending counts the file holds (the one it sends by their reserved id: never
    another, which Redis would count beside it); once the store took every batch,
    delete the spool. The write and its fsyncs run in a thread, off the serving loop;
    the next flush (the next send) waits for it, and a cancel (the stop), however many,
    lets it finish and tells the book what the file holds before it ends this. Never
    raises but that cancel: a write that fails is warned of like a failing flush, and
    the next flush tries again."""
    if not book.unsent_ids():
        _drop_spool(spool)
        return
    on_disk = carried.ids() if carried is not None else set()
    batches = [b for b in book.spooled() if b.id not in on_disk]
    # A future, not a task: no cancel of every task (asyncio.run's, a failed start's)
    # marks it done while the thread still writes.
    write = asyncio.get_running_loop().run_in_executor(None, spool.write, batches)
    cancelled = False
    while not write.done():
        try:
            await asyncio.wait([write])
        except asyncio.CancelledError:
            # The stop, once or again (a time-out around it): the file is as the write
            # leaves it. Going on before would let the stop send the offered counts by
            # a fresh id and delete the spool, and the thread then rename the file
            # holding them by the reserved id into place: counted twice at the next start.
            cancelled = True
    failed = None if write.cancelled() else write.exception()
    if failed is not None:      # whatever it is, the flush loop goes on
        warn.failed("spool", f"usage not stored could not be written to "
                    f"{spool.name}, so a hard kill would lose it", failed)
    book.on_disk(spool.holds())     # the version sent by the reserved id
    if cancelled:
        raise asyncio.CancelledError


def _drop_spool(spool: usage_journal.Spool | None) -> None:
    if spool is None:
        return
    try:
        spool.clear()
    except OSError as exc:
        log.error("usage spooled in %s is stored (or kept in a newer file) but the file "
                  "cannot be deleted (%s): the next start sends it again, and the store "
                  "counts it once", spool.name, exc)


class FlushFailures:
    """The warnings of failing usage flushes: the first failure of each kind (usage, budget
    spend) at once, then at most one every :data:`FLUSH_WARN_EVERY_S` saying how many
    failed since, so a store down for hours does not flood the log while the operator
    still learns that usage is not being stored (``synapse_usage_flush_failures_total``
    counts every one). A failure was a debug line only: a flush failing for every tenant,
    forever, went unseen."""

    def __init__(self, clock: clocks.Clock) -> None:
        self._clock = clock
        self._next: dict[str, float] = {}       # kind -> when its next warning may come
        self._quiet: dict[str, int] = {}        # kind -> failures since its last warning

    def failed(self, kind: str, message: str, exc: BaseException) -> None:
        now = self._clock()
        if now < self._next.get(kind, now):
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            log.debug("%s: %s: %s", message, type(exc).__name__, exc)
            return
        quiet = self._quiet.pop(kind, 0)
        since = f"; {quiet} more failed since the last warning" if quiet else ""
        log.warning("%s (%s: %s); kept for the next flush%s", message, type(exc).__name__,
                    str(exc)[:FLUSH_ERROR_CHARS], since)
        self._next[kind] = now + FLUSH_WARN_EVERY_S


FLUSH_WARN_EVERY_S = 300.0      # at most one warning per kind of flush failure this often
FLUSH_ERROR_CHARS = 300         # of the store's error quoted in a warning


async def _flush(svc: services_mod.Services, fair: fairness.Fairness,
                 disk: usage_db.UsageDb | None = None,
                 failures: FlushFailures | None = None,
                 carried: usage_journal.Carried | None = None,
                 spool: usage_journal.Spool | None = None) -> None:
    warn = failures or FlushFailures(svc.clock)
    if disk is not None:
        local = fair.limiter.local
        spends = local.changed_spends(clocks.wall())
        try:
            if spends:
                await disk.save_spends(spends, clocks.wall())
        except Exception as exc:    # written at the next flush
            local.unsaved(spends)
            svc.metrics.usage_flush_failures.inc()
            warn.failed("spend", f"budget spend not written to {disk.path}", exc)
    if fair.book is None:
        return
    try:
        await fair.book.flush()
    except Exception as exc:    # kept for the next flush, sent again by its batch id
        svc.metrics.usage_flush_failures.inc()
        warn.failed("usage", "usage flush to the usage store failed", exc)
    finally:
        if carried is not None:     # the files whose batches are all stored go
            carried.settle(fair.book.unsent_ids())
        if spool is not None:
            await _spool(fair.book, carried, spool, warn)


# -- reading usage (stats, Admin) ---------------------------------------------------------


async def usage_rows(svc: services_mod.Services, tenant: str | None,
                     since_s: float) -> list[usage_book.Row]:
    fair = get(svc)
    if fair.book is None:
        return []
    return await fair.book.query(tenant, since_s)


async def stats(svc: services_mod.Services) -> dict[str, Any]:
    """The ``fairness`` part of ``/api/v1/stats``: today's usage and the queue. When the
    usage store cannot be read (Redis down), the rest of the stats still answer:
    ``usage_today`` is null and ``usage_error`` says why (never the URL)."""
    fair = get(svc)
    out: dict[str, Any] = {
        "queue_waiting": fair.gate.depths() if fair.gate is not None else {}}
    try:
        rows = await usage_rows(svc, None, 0.0)
    except Exception as exc:    # whatever the store raised: the stats are still useful
        svc.metrics.redis_errors.labels("usage").inc()
        log.debug("usage read failed: %s", exc)
        return {"usage_today": None, "usage_error": f"usage store unreachable "
                f"({type(exc).__name__}): usage left out", **out}
    return {"usage_today": {f"{r.key.tenant}/{r.key.model}": r.counts.as_dict()
                            for r in rows}, **out}
