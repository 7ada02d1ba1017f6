"""Feedback on cache hits: a wrong hit is evicted from both layers and kept as a pair.

Real parts: the tiered cache with MiniLM over a real ``Node.Embed`` server, Milvus Lite
in ``tmp_path`` and the in-process L1; over HTTP, the control plane app with the official
``openai`` client and a real backend stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from controlplane import cache_wiring, errors, main
from controlplane import metrics as metrics_mod
from controlplane.adapters import feedback_log, l1
from controlplane.api import app as routable
from controlplane.api import services as services_mod
from controlplane.core import cache_feedback, response_cache, served_log
from synapse_common import clock as clocks
from synapse_common import embedder_tuning
from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane import test_cache_support as support
from tests.controlplane.test_cache_support import build_cache, chat, counter, remember

node_address = support.node_address       # fixture: a real Node.Embed server

PASSWORD = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


def looped(cache, metrics, path) -> cache_feedback.FeedbackCache:
    parts = cache_feedback.Parts(l1=cache.l1, l2=cache.l2,
                                 sink=feedback_log.JsonlPairs(path))
    return cache_feedback.FeedbackCache(cache, parts, metrics,
                                        served_log.ServedLog(100, 3600.0, clocks.monotonic),
                                        clocks.wall)


def asked(question: str, request_id: str, tenant: str = "acme"):
    return dataclasses.replace(chat(question, tenant=tenant), request_id=request_id)


@pytest.fixture
async def loop(node_address, milvus_lite_path, tmp_path):
    cache, metrics = await build_cache(node_address, milvus_lite_path)
    fb = looped(cache, metrics, tmp_path / "feedback.jsonl")
    yield fb, cache, metrics, tmp_path / "feedback.jsonl"
    await fb.close()


def lines(path) -> list[dict]:
    """Every judged pair kept at ``path`` (each tenant's file, oldest first)."""
    return [json.loads(x) for f in feedback_log.files_of(path)
            for x in f.read_text().splitlines()]


async def test_a_wrong_semantic_hit_is_evicted_from_both_layers_and_recorded(loop):
    fb, cache, metrics, path = loop
    await remember(cache, chat(PASSWORD), "Use the reset link.")
    await cache.l2.flush()          # the row is in Milvus itself, not only in the buffer
    hit = await fb.lookup(asked(PARAPHRASE, "req-1"))
    assert hit.status == "hit-semantic"

    outcome = await fb.feedback("acme", "req-1", wrong=True)
    assert (outcome.layer, outcome.evicted, outcome.recorded) == ("semantic", True, True)
    # Gone from L1 (the exact question misses too) and from L2 (no row left to find).
    assert (await fb.lookup(asked(PASSWORD, "req-2"))).status == "miss"
    assert (await fb.lookup(asked(PARAPHRASE, "req-3"))).status == "miss"
    vector = (await cache.embedder.embed([PARAPHRASE])).vectors[0]
    assert await cache.l2.store.search(hit.hit.source.l2_scope, vector, 5, 0.0) == []

    [pair] = lines(path)
    assert (pair["text_a"], pair["text_b"], pair["label"]) == (PARAPHRASE, PASSWORD, 0)
    assert (pair["tenant"], pair["model"], pair["request_id"]) == ("acme", "llama", "req-1")
    assert pair["score"] == hit.hit.score and pair["verifier"] == cache.judges.fitted.digest
    assert pair["embedder_id"] == hit.hit.source.embedder_id == embedder_tuning.base_id()
    assert counter(metrics, "synapse_cache_feedback_total", model="llama", layer="semantic",
                   verdict="wrong", tenant="acme") == 1
    assert counter(metrics, "synapse_cache_live_precision", model="llama",
                   bound="estimate") == 0.0


async def test_a_right_hit_stays_and_counts_toward_live_precision(loop):
    fb, cache, metrics, path = loop
    await remember(cache, chat(PASSWORD), "Use the reset link.")
    for i in range(3):
        assert (await fb.lookup(asked(PARAPHRASE, f"ok-{i}"))).status == "hit-semantic"
        outcome = await fb.feedback("acme", f"ok-{i}", wrong=False)
        assert not outcome.evicted and outcome.recorded
    assert (await fb.lookup(asked(PARAPHRASE, "after"))).status == "hit-semantic"
    assert [p["label"] for p in lines(path)] == [1, 1, 1]
    estimate, lower, upper, n = fb.live_precision("llama")
    assert (estimate, n) == (1.0, 3) and 0.3 < lower < 1.0 and upper == 1.0
    assert counter(metrics, "synapse_cache_live_precision", model="llama",
                   bound="lower") == pytest.approx(lower)


async def test_a_wrong_exact_hit_is_evicted_but_no_pair_is_kept(loop):
    fb, cache, _, path = loop
    await remember(cache, chat(PASSWORD), "A wrong answer.")
    assert (await fb.lookup(asked(PASSWORD, "x-1"))).status == "hit-exact"
    outcome = await fb.feedback("acme", "x-1", wrong=True)
    assert (outcome.layer, outcome.evicted, outcome.recorded) == ("exact", True, False)
    assert (await fb.lookup(asked(PASSWORD, "x-2"))).status == "miss"
    assert (await fb.lookup(asked(PARAPHRASE, "x-3"))).status == "miss"   # L2 row gone too
    assert feedback_log.files_of(path) == []


async def test_feedback_only_on_the_tenants_own_recent_hits_and_only_once(loop):
    fb, cache, _, _ = loop
    await remember(cache, chat(PASSWORD), "Use the reset link.")
    await fb.lookup(asked(PASSWORD, "mine"))
    with pytest.raises(errors.NotFound, match="request id 'mine'"):
        await fb.feedback("intruder", "mine", wrong=True)       # another tenant's id
    await fb.feedback("acme", "mine", wrong=False)
    with pytest.raises(errors.NotFound):
        await fb.feedback("acme", "mine", wrong=True)           # judged already
    with pytest.raises(errors.NotFound):
        await fb.feedback("acme", "never-served", wrong=True)
    assert (await fb.lookup(asked(PASSWORD, "again"))).status == "hit-exact"


class _Mesh:
    """A served log's listener, as in a pod of workers (records arrive from siblings)."""

    def served(self, request_id, served) -> None:
        pass

    def taken(self, tenant, request_id) -> None:
        pass


async def test_in_a_pod_a_hit_a_sibling_just_served_is_waited_for_not_refused(loop):
    fb, cache, _, _ = loop
    await remember(cache, chat(PASSWORD), "Use the reset link.")
    await fb.lookup(asked(PASSWORD, "here"))
    record = fb.served.take("acme", "here")     # as if a sibling worker had served it
    assert record is not None
    fb.served.listener = _Mesh()

    async def arrives_late() -> None:
        await asyncio.sleep(0.1)
        fb.served.remember("sibling", record)
    late = asyncio.create_task(arrives_late())
    outcome = await fb.feedback("acme", "sibling", wrong=False)
    assert outcome.layer == "exact"
    await late
    with pytest.raises(errors.NotFound):        # another tenant's waits, then 404 alike
        await fb.feedback("intruder", "sibling", wrong=True)


def test_the_served_log_is_bounded_per_tenant_and_in_age():
    now = [0.0]
    log = served_log.ServedLog(per_tenant=2, max_age_s=60.0, clock=lambda: now[0], tenants=2)
    entry = served_log.Served("a", "m", "exact", "q", "q", "k", "", None, None)
    for rid in ("1", "2", "3"):
        log.remember(rid, entry)
    assert log.take("a", "1") is None and len(log) == 2      # the oldest left first
    now[0] = 61.0
    assert log.take("a", "2") is None                        # too old to act on
    for tenant in ("b", "c"):
        log.remember("x", dataclasses.replace(entry, tenant=tenant))
    assert log.take("a", "3") is None                        # tenant a left: only 2 kept


def test_the_served_log_keeps_only_a_semantic_hits_short_texts_within_a_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hits cost no tokens: one tenant repeating a cached request with a 440 KB prompt
    grew the log by its texts at every hit (probe: a gigabyte in seconds)."""
    now = [0.0]
    log = served_log.ServedLog(per_tenant=10_000, max_age_s=60.0, clock=lambda: now[0])
    long = "x" * 440_000
    exact = served_log.Served("a", "m", "exact", long, long, "k", "", None, None)
    for i in range(100):
        log.remember(f"e{i}", exact)
    assert log.chars() == 0                     # an exact hit is evicted by its key alone
    assert log.take("a", "e99") == dataclasses.replace(exact, query="", text="", pair=False)
    semantic = served_log.Served("a", "m", "semantic", "q?", "question?", "k", "s", 0.9, 0.8)
    log.remember("s1", semantic)
    assert log.take("a", "s1") == semantic       # short: its pair is kept
    log.remember("s2", dataclasses.replace(semantic, text=long))
    assert log.take("a", "s2").pair is False and log.chars() == 0   # cut, it would lie
    monkeypatch.setattr(served_log, "TEXT_BUDGET", 1000)
    for i in range(200):
        log.remember(f"b{i}", dataclasses.replace(semantic, query="q" * 90))   # 99 each
    assert log.chars() <= 1000 and log.take("a", "b199") is not None
    assert log.take("a", "b100") is None        # the oldest out first
    log.remember("other", dataclasses.replace(semantic, tenant="b"))
    assert log.take("b", "other") is not None    # another tenant's budget is its own
    now[0] = 61.0
    log.remember("new", semantic)               # the stale ones go as new ones come
    assert len(log) == 1 and log.chars() == semantic.chars


async def test_a_long_semantic_hits_verdict_counts_and_evicts_but_records_no_pair(
        loop, monkeypatch: pytest.MonkeyPatch) -> None:
    fb, cache, metrics, path = loop
    monkeypatch.setattr(served_log, "PAIR_TEXT_MAX", 20)
    await remember(cache, chat(PASSWORD), "Use the reset link.")
    await cache.l2.flush()
    assert (await fb.lookup(asked(PARAPHRASE, "long-1"))).status == "hit-semantic"
    outcome = await fb.feedback("acme", "long-1", wrong=True)
    assert (outcome.layer, outcome.evicted, outcome.recorded) == ("semantic", True, False)
    assert feedback_log.files_of(path) == []
    assert counter(metrics, "synapse_cache_feedback_total", model="llama", layer="semantic",
                   verdict="wrong", tenant="acme") == 1


def test_no_single_tenant_moves_the_live_precision_bounds_past_what_the_others_show():
    """Hits cost a tenant nothing, so it can judge thousands of its own: its verdicts
    alone must not raise the lower bound over what the other tenants' verdicts show (it
    would hide their wrong hits), nor lower the upper bound."""
    honest = {"b": (14, 6), "c": (15, 5)}                      # 29 of 40 right
    _, honest_low, honest_high = cache_feedback.wilson(29, 40)
    flooded = cache_feedback.live_interval({**honest, "a": (5000, 0)})
    assert flooded[0] > 0.99                                   # the pooled estimate moves
    assert flooded[1] <= honest_low and flooded[2] >= honest_high
    slandered = cache_feedback.live_interval({**honest, "a": (0, 5000)})
    assert slandered[2] >= honest_high
    pooled = cache_feedback.wilson(29, 40)
    assert cache_feedback.live_interval({"b": (29, 11)})[:3] == pytest.approx(pooled)
    assert math.isnan(cache_feedback.live_interval({})[0])


def test_wilson_interval():
    estimate, lower, upper = cache_feedback.wilson(90, 100)
    assert estimate == 0.9 and lower == pytest.approx(0.8256, abs=1e-3)
    assert upper == pytest.approx(0.9448, abs=1e-3)
    assert math.isnan(cache_feedback.wilson(0, 0)[0])


@contextlib.asynccontextmanager
async def judged_replica(tmp_path, mode: str):
    """A control plane whose exact-only cache has the feedback loop, in front of one
    stand-in backend of ``mode``: (the replica, the backend, the cache, its metrics)."""
    metrics = metrics_mod.Metrics(CollectorRegistry())
    cache = response_cache.TieredCache(options=response_cache.Options(semantic_enabled=False),
                                       l1=l1.MemoryL1(100, 10**6), metrics=metrics)
    async with t.backends(("one", mode)) as (b,):
        # A slow probe round (2 s time limit): a busy machine must not flap the backend.
        s = t.settings(upstreams=[t.upstream("one", b.url)],
                       registry={"upstream_probe_interval_s": 5.0})
        async with t.running(s, cache=looped(cache, metrics, tmp_path / "f.jsonl")) as cp:
            await harness.until(lambda: routable.routable_count(cp.services) > 0, 20, "the backend")
            yield cp, b, cache, metrics


HI_ASK = dict(model="llama", temperature=0, messages=[{"role": "user", "content": "hi"}])


async def test_feedback_over_http_evicts_an_exact_hit(tmp_path):
    async with judged_replica(tmp_path, "ok") as (cp, _, cache, metrics):
        client = cp.client()
        ask = HI_ASK
        await client.chat.completions.create(**ask)
        await cache.drain()
        hit = await client.chat.completions.with_raw_response.create(**ask)
        assert hit.headers["x-synapse-cache"] == "hit-exact"
        rid = hit.headers["x-request-id"]
        async with aiohttp.ClientSession() as s:
            url = f"{cp.url}/v1/cache/feedback"
            async with s.post(url, json={"request_id": rid, "wrong": True},
                              headers={"Authorization": f"Bearer {t.KEY_B}"}) as r:
                assert r.status == 404      # tenant b cannot act on a's answers
                assert (await r.json())["error"]["code"] == "unknown_request_id"
            async with s.post(url, json={"request_id": rid, "wrong": "yes"},
                              headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "wrong"
            async with s.post(url, json={"request_id": rid, "wrong": True}) as r:
                assert r.status == 401
            async with s.post(url, json={"request_id": rid, "wrong": True},
                              headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                assert r.status == 200
                assert await r.json() == {"request_id": rid, "layer": "exact",
                                          "wrong": True, "evicted": True,
                                          "recorded": False}
        again = await client.chat.completions.with_raw_response.create(**ask)
        assert again.headers["x-synapse-cache"] == "miss"
        assert counter(metrics, "synapse_cache_feedback_total", model=t.MODEL,
                       layer="exact", verdict="wrong", tenant="a") == 1


async def test_feedback_on_a_coalesced_followers_id_evicts_the_leaders_answer(tmp_path):
    """A request answered from an identical one in flight (coalescing) is labelled
    hit-exact: its id was unknown to feedback (a 404), and the coalescer's copy of the
    answer went on serving for seconds after a wrong verdict evicted the entry."""
    async with judged_replica(tmp_path, "slow") as (cp, b, cache, _):
        client = cp.client()
        ask = HI_ASK
        both = await asyncio.gather(*(client.chat.completions.with_raw_response.create(**ask)
                                      for _ in range(2)))
        assert len(b.bodies) == 1
        follower = next(r for r in both if r.headers["x-synapse-cache"] == "hit-exact")
        await cache.drain()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{cp.url}/v1/cache/feedback",
                                 json={"request_id": follower.headers["x-request-id"],
                                       "wrong": True},
                                 headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["evicted"] is True
        again = await client.chat.completions.with_raw_response.create(**ask)
        assert again.headers["x-synapse-cache"] == "miss" and len(b.bodies) == 2
        await client.close()


async def test_feedback_without_a_cache_is_a_conflict():
    async with t.running(t.settings()) as cp, aiohttp.ClientSession() as s:
        async with s.post(f"{cp.url}/v1/cache/feedback", json={"request_id": "r", "wrong": True},
                          headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "cache_disabled"


async def test_a_feedback_body_larger_than_an_id_and_a_boolean_is_refused_unparsed():
    """Up to http.max_body_bytes of JSON was parsed on the event loop, uncharged, and then
    answered 404: one tenant could keep the loop busy for everyone (probe finding)."""
    padded = b'{"request_id": "r", "wrong": true, "pad": [' + b"[]," * 400_000 + b"[]]}"

    async def chunks():
        for i in range(0, len(padded), 65536):
            yield padded[i:i + 65536]
    async with t.running(t.settings()) as cp, aiohttp.ClientSession() as s:
        auth = {"Authorization": f"Bearer {t.KEY_A}", "Content-Type": "application/json"}
        async with s.post(f"{cp.url}/v1/cache/feedback", data=padded, headers=auth) as r:
            assert r.status == 413 and "feedback body" in (await r.json())["error"]["message"]
        async with s.post(f"{cp.url}/v1/cache/feedback", data=chunks(), headers=auth) as r:
            assert r.status == 413      # chunked: no length to refuse it by up front


async def test_a_verdict_whose_eviction_failed_is_not_used_up() -> None:
    """Probe finding: with Redis paused the feedback got a 503, the entry was still served,
    and the same feedback sent again got a 404."""
    class FlakyL1:
        def __init__(self) -> None:
            self.deleted: list[str] = []
            self.fail = True

        async def delete(self, tenant: str, model: str, ref: str) -> None:
            if self.fail:
                raise ConnectionError("redis paused")
            self.deleted.append(ref)
    l1_layer = FlakyL1()
    metrics = metrics_mod.Metrics(CollectorRegistry())
    fb = cache_feedback.FeedbackCache(
        None, cache_feedback.Parts(l1=l1_layer, l2=None, sink=None),  # type: ignore[arg-type]
        metrics, served_log.ServedLog(100, 3600.0, clocks.monotonic), clocks.wall)
    fb.served.remember("x-1", served_log.Served("acme", "llama", "exact", "", "", "key-1", "",
                                                None, None))
    with pytest.raises(errors.Unavailable, match="send it again"):
        await fb.feedback("acme", "x-1", wrong=True)
    assert counter(metrics, "synapse_cache_feedback_total", model="llama", layer="exact",
                   verdict="wrong", tenant="acme") == 0
    l1_layer.fail = False
    outcome = await fb.feedback("acme", "x-1", wrong=True)      # the same feedback again
    assert outcome.evicted and l1_layer.deleted == ["key-1"]
    assert counter(metrics, "synapse_cache_feedback_total", model="llama", layer="exact",
                   verdict="wrong", tenant="acme") == 1
    with pytest.raises(errors.NotFound):                         # then used up
        await fb.feedback("acme", "x-1", wrong=True)


async def test_without_the_semantic_layer_a_wrong_verdict_opens_no_store(tmp_path):
    """``cache.semantic_enabled: false`` built an L2 all the same, and a wrong verdict
    opened Milvus Lite at ``data_dir/l2.db`` to evict rows that cannot exist: in a pod of
    two workers the second could not open the file (one process's) and the tenant got a
    503 naming its path; alone, the file was made for nothing."""
    async with t.backends(("one", "ok")) as (b,):
        s = t.settings(upstreams=[t.upstream("one", b.url)], data_dir=str(tmp_path / "data"),
                       cache={"semantic_enabled": False},
                       registry={"upstream_probe_interval_s": 5.0})
        cache = main.build_response_cache(s, services_mod.build(s))
        assert isinstance(cache, cache_feedback.FeedbackCache)
        async with t.running(s, cache=cache) as cp:
            await harness.until(lambda: routable.routable_count(cp.services) > 0, 20, "the backend")
            client = cp.client()
            await client.chat.completions.create(**HI_ASK)
            await cache.inner.drain()
            hit = await client.chat.completions.with_raw_response.create(**HI_ASK)
            assert hit.headers["x-synapse-cache"] == "hit-exact"
            async with aiohttp.ClientSession() as session, session.post(
                    f"{cp.url}/v1/cache/feedback",
                    json={"request_id": hit.headers["x-request-id"], "wrong": True},
                    headers={"Authorization": f"Bearer {t.KEY_A}"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["evicted"] is True
            again = await client.chat.completions.with_raw_response.create(**HI_ASK)
            assert again.headers["x-synapse-cache"] == "miss"
        await cache.close()
    assert not (tmp_path / "data" / cache_wiring.L2_LITE_FILE).exists()


async def test_a_failed_eviction_or_recording_names_the_layer_never_a_path(
        node_address, milvus_lite_path, tmp_path, caplog):
    """The tenant is told which layer failed; the error's own text (the store's path or
    host, the feedback file's path) goes to the operator's log only."""
    cache, metrics = await build_cache(node_address, milvus_lite_path)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    broken = cache_wiring.milvus_l2(str(blocked / "l2.db"), "synapse_cache")
    fb = cache_feedback.FeedbackCache(
        cache, cache_feedback.Parts(l1=cache.l1, l2=broken,
                                    sink=feedback_log.JsonlPairs(blocked / "f.jsonl")),
        metrics, served_log.ServedLog(100, 3600.0, clocks.monotonic), clocks.wall)
    try:
        await remember(cache, chat(PASSWORD), "Use the reset link.")
        assert (await fb.lookup(asked(PARAPHRASE, "bad-1"))).status == "hit-semantic"
        with pytest.raises(errors.Unavailable) as refused:
            await fb.feedback("acme", "bad-1", wrong=True)
        message = str(refused.value)
        assert "semantic layer unavailable" in message
        assert "the feedback pair could not be recorded" in message
        assert str(tmp_path) not in message and "blocked" not in message
        assert str(blocked) in caplog.text              # the operator's log has it
    finally:
        await fb.close()
        await broken.close()


async def test_a_cache_pinned_to_one_embedder_gives_the_l2_its_dimension(tmp_path):
    """A hostile node answering the first Node.Embed of a fresh collection could create it
    with its own dimension (every honest write failing after). A cache pinned to one
    embedder knows the dimension from its verifier; an unpinned one learns it."""
    from synapse_common import embedder_tuning
    for extra, dim in (({"embedder_id": embedder_tuning.base_id()}, 384), ({}, None)):
        s = t.settings(data_dir=str(tmp_path / f"d{dim}"), cache=extra)
        cache = main.build_response_cache(s, services_mod.build(s))
        assert cache.inner.l2 is not None and cache.inner.l2.schema.expected == dim
        await cache.close()
