"""Without Redis, a restart on the same data_dir keeps the tenants' budgets and usage
(controlplane/adapters/usage_db.py): through real control planes and the official openai
client, and the file's own rules (kept by a process that never stopped, private, a
damaged file set aside)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import sqlite3

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types import chat

from controlplane import config
from controlplane.adapters import usage_db, usage_journal
from controlplane.api import app as app_mod
from controlplane.api import fairness, fairness_wiring
from controlplane.core import token_limits, usage_book
from protos.synapse.v1 import admin_pb2
from synapse_common import clock as clocks
from tests import harness
from tests.clock import ManualClock
from tests.controlplane import cp_testing as t

HI: list[chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
WALL = 1_796_000_000.0      # a fixed wall clock, mid-month


def budgeted(tmp_path: pathlib.Path, upstream_url: str,
             tokens: int) -> config.ControlPlaneSettings:
    tenants = [{"name": "a", "keys": [t.KEY_A], "budget": {"tokens": tokens,
                                                            "period": "month"}},
               {"name": "b", "keys": [t.KEY_B]}]
    return t.settings(auth={"tenants": tenants}, data_dir=str(tmp_path),
                      registry={"upstream_probe_interval_s": 5.0},
                      upstreams=[t.upstream("one", upstream_url)])


async def routable(cp: t.RunningCP) -> None:
    await harness.until(lambda: app_mod.routable_count(cp.services) > 0, 20, "a backend")


async def spend_until_refused(cp: t.RunningCP) -> int:
    """Requests of tenant a answered before its budget refused one."""
    client = cp.client(t.KEY_A)
    answered = 0
    with pytest.raises(openai.RateLimitError) as over:
        for _ in range(50):
            await client.chat.completions.create(model="llama", messages=HI)
            answered += 1
    assert over.value.code == "budget_exceeded"
    return answered


async def usage_of(cp: t.RunningCP, tenant: str) -> usage_book.Counts:
    return usage_book.totals(await fairness_wiring.usage_rows(cp.services, tenant, 86_400.0))


async def test_a_restart_on_the_same_data_dir_keeps_the_budget_spent_and_the_usage(
        tmp_path: pathlib.Path) -> None:
    """Probe finding: without Redis a restart gave the tenant a fresh budget (another
    budget's worth served) and `get usage` showed only the new requests."""
    async with t.backends(("one", "ok")) as (backend,):
        s = budgeted(tmp_path, backend.url, 40)
        async with t.running(s) as cp:
            await routable(cp)
            answered = await spend_until_refused(cp)
            assert answered > 0
        async with t.running(s) as cp:
            await routable(cp)
            with pytest.raises(openai.RateLimitError) as over:
                await cp.client(t.KEY_A).chat.completions.create(model="llama", messages=HI)
            assert over.value.code == "budget_exceeded"
            assert (await usage_of(cp, "a")).requests >= answered
            await cp.client(t.KEY_B).chat.completions.create(model="llama", messages=HI)
    assert (tmp_path / usage_db.FILE).stat().st_mode & 0o777 == 0o600


async def test_a_spent_budget_is_on_disk_before_the_next_round_of_the_flush(
        tmp_path: pathlib.Path) -> None:
    """A kill right after the budget was exceeded must not give the tenant a fresh one: the
    charge that spends it is written at once, not an interval later (here an hour)."""
    async with t.backends(("one", "ok")) as (backend,):
        s = budgeted(tmp_path, backend.url, 40)
        s = s.model_copy(update={"fairness": s.fairness.model_copy(update={
            "usage": s.fairness.usage.model_copy(update={"flush_interval_s": 3600.0})})})
        async with t.running(s) as cp:
            await routable(cp)
            await spend_until_refused(cp)

            def kept() -> float:    # what a process started now (the first one killed) finds
                found = usage_db.UsageDb(str(tmp_path / usage_db.FILE), 62)
                try:
                    return sum(spent for spent, _ in found.open_now(clocks.wall()).values())
                finally:
                    found.close()
            await harness.until(lambda: kept() >= 40, 10, "the spent budget on disk")


def charged(store: token_limits.LocalTokenStore, amount: float) -> token_limits.Ask:
    ask = token_limits.Ask("", 0, int(amount), "a\x1f\x1f2026-12", 100.0, amount, 3600.0)
    assert store.check([ask]).allowed
    return ask


async def test_a_process_killed_after_its_flush_keeps_the_spend(tmp_path: pathlib.Path) -> None:
    """What one flush wrote is found by the next process, though the first never closed
    its file (a kill); what changed after the flush is what a kill may lose."""
    path = str(tmp_path / "d" / usage_db.FILE)
    first, store = usage_db.UsageDb(path, 62), token_limits.LocalTokenStore(ManualClock())
    assert first.open_now(WALL) == {}
    charged(store, 120.0)
    await first.save_spends(store.changed_spends(WALL), WALL)
    await first.add({("2026-12-07", "a", "m"): {"requests": 3, "prompt_tokens": 90,
                                                "cost": 0.5}}, usage_book.batch_id())
    # no close: killed
    again = usage_db.UsageDb(path, 62)
    later = token_limits.LocalTokenStore(ManualClock())
    later.restore_spends(again.open_now(WALL + 10), WALL + 10)
    assert later.spent("a\x1f\x1f2026-12") == 120.0
    verdict = later.check([token_limits.Ask("", 0, 1, "a\x1f\x1f2026-12", 100.0, 1.0, 3600.0)])
    assert not verdict.allowed
    rows = await again.read(["2026-12-07"], "a")
    assert rows == {("2026-12-07", "a", "m"): {"requests": 3, "prompt_tokens": 90,
                                               "cost": 0.5}}
    assert pathlib.Path(path).parent.stat().st_mode & 0o777 == 0o700
    # a period that ended is not restored, and is deleted
    assert usage_db.UsageDb(path, 62).open_now(WALL + 3600) == {}
    first.close()
    again.close()


async def test_usage_keeps_the_newest_retention_days(tmp_path: pathlib.Path) -> None:
    db = usage_db.UsageDb(str(tmp_path / usage_db.FILE), 2)
    db.open_now(WALL)
    for day in ("2026-12-05", "2026-12-06", "2026-12-07"):
        await db.add({(day, "a", "m"): {"requests": 1}}, usage_book.batch_id())
    days = ["2026-12-05", "2026-12-06", "2026-12-07"]
    assert sorted(k[0] for k in await db.read(days, None)) == days[1:]
    db.close()


def test_a_damaged_file_is_set_aside_and_a_new_one_started(tmp_path: pathlib.Path) -> None:
    path = tmp_path / usage_db.FILE
    path.write_bytes(b"not a database" * 100)
    db = usage_db.UsageDb(str(path), 62)
    assert db.open_now(WALL) == {}
    (copy,) = tmp_path.glob(usage_db.FILE + ".corrupt-*")
    assert copy.read_bytes().startswith(b"not a")
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT count(*) FROM spend").fetchone() == (0,)
    db.close()


async def test_a_row_sqlite_refuses_is_dropped_and_every_other_row_stored(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    """Probe finding: one tenant's count past int64 (a hostile engine's 10**30) made every
    flush fail, all tenants' rows in its transaction; now that row alone is dropped, with a
    warning naming the tenant (never the number's thousands of digits)."""
    db = usage_db.UsageDb(str(tmp_path / usage_db.FILE), 62)
    db.open_now(WALL)
    day = "2026-12-07"
    with caplog.at_level(logging.WARNING, "synapse.controlplane.fairness"):
        await db.add({(day, "evil", "m"): {"requests": 1, "prompt_tokens": 10**5000},
                      (day, "b", "m"): {"requests": 2, "prompt_tokens": 30},
                      (day, "nan", "m"): {"requests": 1, "cost": float("nan")}}, usage_book.batch_id())
    assert await db.read([day], None) == {(day, "b", "m"): {"requests": 2, "prompt_tokens": 30}}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert "'evil'" in warned[0] and "prompt_tokens" in warned[0]
    assert "999" not in warned[0] and len(warned[0]) < 300
    assert "'nan'" in warned[1] and "cost" in warned[1]
    await db.add({(day, "evil", "m"): {"requests": 1}}, usage_book.batch_id())
    assert (await db.read([day], "evil"))[(day, "evil", "m")] == {"requests": 1}
    db.read_only = True     # a file this run cannot write: its counts kept in memory
    await db.add({(day, "evil", "m"): {"requests": 1, "prompt_tokens": 2**64},
                  (day, "b", "m"): {"requests": 1}}, usage_book.batch_id())
    found = await db.read([day], None)
    assert found[(day, "b", "m")]["requests"] == 3
    assert found[(day, "evil", "m")] == {"requests": 1}     # the file's: none in memory
    db.close()


async def test_a_total_stops_at_int64_and_a_value_read_is_one_get_usage_can_carry(
        tmp_path: pathlib.Path) -> None:
    """SQLite turns a sum past int64 into a float, read back as 2**63 (and a stored float
    infinity did not read at all): Admin.GetUsage's uint64 fields refused the row, and
    with it every tenant's answer."""
    path = tmp_path / usage_db.FILE
    db = usage_db.UsageDb(str(path), 62)
    db.open_now(WALL)
    day = "2026-12-07"
    await db.add({(day, "a", "m"): {"requests": usage_db.INT64_MAX}}, usage_book.batch_id())
    await db.add({(day, "a", "m"): {"requests": usage_db.INT64_MAX}}, usage_book.batch_id())
    with sqlite3.connect(path) as older:        # what an earlier release could leave
        older.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?)", [
            (day, "b", "m", "prompt_tokens", 1e30), (day, "b", "m", "errors", float("inf")),
            (day, "b", "m", "requests", -3)])
    found = await db.read([day], None)
    assert found[(day, "a", "m")] == {"requests": usage_db.INT64_MAX}
    assert found[(day, "b", "m")] == {"prompt_tokens": usage_db.INT64_MAX,
                                      "errors": usage_db.INT64_MAX, "requests": 0}
    for key, plain in found.items():     # the Admin answer's own conversion
        fairness._row(usage_book.Row(usage_book.RowKey(*key), usage_book.counts_of(plain)))
    db.close()


async def test_usage_an_older_release_kept_past_int64_stops_no_flush_after_a_restart(
        tmp_path: pathlib.Path) -> None:
    """Probe finding: the poisoned rows kept at the stop (the flush had failed) were taken
    back at the next start and failed every flush again, forever: another tenant's usage
    stayed frozen. Now the journal's bad value is skipped when it is taken back and the
    rest is stored."""
    day = usage_book.day_of(clocks.wall())
    usage_journal.keep(tmp_path / usage_journal.FILE, [usage_book.Batch("older", {
        (day, "a", "llama"): {"requests": 1, "prompt_tokens": 10**30},
        (day, "b", "llama"): {"requests": 4, "prompt_tokens": 12}})])
    async with t.backends(("one", "ok")) as (backend,):
        async with t.running(budgeted(tmp_path, backend.url, 10**6)) as cp:
            book = fairness_wiring.get(cp.services).book
            assert book is not None
            await routable(cp)
            await harness.until(lambda: book.pending() == {}, 10, "the first flush")
            await cp.client(t.KEY_B).chat.completions.create(model="llama", messages=HI)
            await harness.until(lambda: book.pending() == {}, 10, "the next flush")
            assert (await usage_of(cp, "b")).requests == 5
            assert cp.services.metrics.registry.get_sample_value(
                "synapse_usage_flush_failures_total") == 0
            answer = await fairness.usage_response(cp.services, admin_pb2.GetUsageRequest())
            def total(tenant: str, field: str) -> int:
                return sum(getattr(r, field) for r in answer.rows if r.tenant == tenant)
            assert (total("a", "requests"), total("a", "prompt_tokens")) == (1, 0)
            assert total("b", "requests") == 5
    assert not [n for n in os.listdir(tmp_path) if n.startswith(usage_journal.FILE)]


class HostileEngine(t.FakeBackend):
    """An engine (compromised) whose usage counts are ``count``, written as given."""

    count = b"5"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        n = self.count
        usage = b'{"prompt_tokens":%s,"completion_tokens":%s,"total_tokens":1}' % (n, n)
        head = b'{"id":"x","object":"chat.completion%s","created":1,"model":"%s",' % (
            b".chunk" if body.get("stream") else b"", body["model"].encode())
        if not body.get("stream"):
            return web.Response(body=head + b'"choices":[{"index":0,"message":{"role":'
                                b'"assistant","content":"hi"},"finish_reason":"stop"}],'
                                b'"usage":' + usage + b"}", content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + head + b'"choices":[{"index":0,"delta":{"content":"hi"},'
                         b'"finish_reason":"stop"}]}\n\n')
        await resp.write(b"data: " + head + b'"choices":[],"usage":' + usage + b"}\n\n"
                         b"data: [DONE]\n\n")
        return resp


async def test_an_engines_count_past_any_sane_size_is_estimated_and_stops_no_flush(
        tmp_path: pathlib.Path) -> None:
    """Probe findings: an engine's 5000-digit count was a 500 to the tenant (Python's
    int-string limit), and its 2**63 made every usage flush fail, every tenant's; now
    both answers are served and counted from the control plane's estimate."""
    engine = HostileEngine("one")
    await engine.start()
    try:
        async with t.running(budgeted(tmp_path, engine.url, 10**6)) as cp:
            book = fairness_wiring.get(cp.services).book
            assert book is not None
            await routable(cp)
            client = cp.client(t.KEY_A)
            engine.count = b"9" * 5000      # more than the openai client itself can read
            async with aiohttp.ClientSession() as http, http.post(
                    f"{cp.url}/v1/chat/completions", json={"model": "llama", "messages": HI},
                    headers={"Authorization": f"Bearer {t.KEY_A}"}) as answer:
                assert answer.status == 200
                assert b"9" * 5000 in await answer.read()
            engine.count = str(2**63).encode()
            async for _ in await client.chat.completions.create(model="llama", messages=HI,
                                                                stream=True):
                pass
            engine.count = b"5"
            await cp.client(t.KEY_B).chat.completions.create(model="llama", messages=HI)
            for _ in range(200):     # b's request settled, and every row stored
                if book.pending() == {} and (await usage_of(cp, "b")).requests == 1:
                    break
                await asyncio.sleep(0.05)
            used = await usage_of(cp, "a")
            assert (used.requests, used.estimated) == (2, 2)
            assert used.prompt_tokens < 1000 and used.completion_tokens < 1000
            assert (await usage_of(cp, "b")).requests == 1
            assert cp.services.metrics.registry.get_sample_value(
                "synapse_usage_flush_failures_total") == 0
    finally:
        await engine.stop()
