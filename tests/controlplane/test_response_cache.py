"""The tiered response cache with real parts: MiniLM over Node.Embed, Milvus Lite, L1."""

from __future__ import annotations

import logging
import pathlib

import pytest

from controlplane import errors
from controlplane.adapters import l1
from controlplane.core import cache_budget, stream_fold
from tests.controlplane import test_cache_support as support
from tests.controlplane.l2.fakes import ManualTime
from tests.controlplane.test_cache_support import answer, build_cache, chat, counter, remember

node_address = support.node_address       # fixture: a real Node.Embed server

PASSWORD = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


@pytest.fixture
async def cache(node_address, milvus_lite_path):
    c, m = await build_cache(node_address, milvus_lite_path)
    yield c, m
    await c.close()


async def test_repeat_is_exact_paraphrase_is_semantic_and_near_miss_is_not(cache):
    c, m = cache
    await remember(c, chat(PASSWORD), "Use the reset link.")
    exact = await c.lookup(chat(PASSWORD))
    assert exact.status == "hit-exact"
    assert exact.hit.response["choices"][0]["message"]["content"] == "Use the reset link."

    semantic = await c.lookup(chat(PARAPHRASE))
    assert semantic.status == "hit-semantic"
    assert semantic.hit.similarity > 0.9 and semantic.hit.score >= c.judges.fitted.threshold
    assert semantic.hit.response["choices"][0]["message"]["content"] == "Use the reset link."

    await remember(c, chat("How can I lose 5 kg in a month?"), "Eat less.")
    assert (await c.lookup(chat("How can I lose 15 kg in a month?"))).status == "miss"
    assert counter(m, "synapse_cache_hits_total", layer="exact") == 1
    assert counter(m, "synapse_cache_hits_total", layer="semantic") == 1
    assert counter(m, "synapse_cache_stores_total", layer="semantic") == 2


async def test_semantic_hits_survive_a_flush(cache):
    c, _ = cache
    await remember(c, chat(PASSWORD), "Use the reset link.")
    await c.l2.flush()      # rows now come from Milvus itself, not the recent buffer
    assert not c.l2.recent
    assert (await c.lookup(chat(PARAPHRASE))).status == "hit-semantic"


async def test_cache_control_and_bypass_rules(cache):
    c, m = cache
    no_cache = await c.lookup(chat(PASSWORD, cache_control="no-cache"))
    assert no_cache.status == "bypass" and no_cache.may_store
    c.store(no_cache, answer("stored anyway"))
    await c.drain()
    assert (await c.lookup(chat(PASSWORD))).status == "hit-exact"
    assert (await c.lookup(chat(PARAPHRASE))).status == "hit-semantic"   # embedded at store

    no_store = await c.lookup(chat("What is the capital of France?", cache_control="no-store"))
    assert no_store.status == "miss" and not no_store.may_store
    c.store(no_store, answer("Paris"))
    await c.drain()
    assert (await c.lookup(chat("What is the capital of France?"))).status == "miss"

    for req in (chat(PASSWORD, n=2), chat(PASSWORD, temperature=1.2)):
        decision = await c.lookup(req)
        assert decision.status == "bypass" and not decision.may_store
    assert counter(m, "synapse_cache_bypass_total", reason="n>1") == 1
    assert counter(m, "synapse_cache_bypass_total", reason="temperature") == 1


async def test_incomplete_responses_are_never_stored(cache):
    c, _ = cache
    for finish in ("tool_calls", None):
        decision = await c.lookup(chat(PASSWORD))
        bad = answer("partial")
        bad["choices"][0]["finish_reason"] = finish
        c.store(decision, bad)
        await c.drain()
    c.store(await c.lookup(chat(PASSWORD)), {"error": {"message": "boom"}})
    await c.drain()
    assert (await c.lookup(chat(PASSWORD))).status == "miss"


async def test_invalidate_by_tenant_clears_both_layers(cache):
    c, _ = cache
    await remember(c, chat(PASSWORD, tenant="acme"), "acme answer")
    await remember(c, chat(PASSWORD, tenant="globex"), "globex answer")
    assert await c.invalidate(tenant="acme") == (1, 1)
    assert (await c.lookup(chat(PASSWORD, tenant="acme"))).status == "miss"
    assert (await c.lookup(chat(PARAPHRASE, tenant="acme"))).status == "miss"
    assert (await c.lookup(chat(PARAPHRASE, tenant="globex"))).status == "hit-semantic"
    assert await c.invalidate(everything=True) == (1, 1)
    with pytest.raises(ValueError):
        await c.invalidate()


async def test_l2_entries_expire_with_the_ttl(node_address, milvus_lite_path):
    now = ManualTime(1_000_000.0)
    c, _ = await build_cache(node_address, milvus_lite_path, ttl_s=60, time=now)
    await remember(c, chat(PASSWORD), "old")
    await c.l1.invalidate(None, None)        # only L2 could still answer
    await remember(c, chat("unrelated question about tea"), "tea")
    now.now += 61
    assert (await c.lookup(chat(PARAPHRASE))).status == "miss"
    await c.close()


async def test_embedder_down_is_a_counted_miss(milvus_lite_path):
    c, m = await build_cache("127.0.0.1:1", milvus_lite_path, semantic_budget_s=0.5)
    decision = await c.lookup(chat(PASSWORD))
    assert decision.status == "miss"
    assert counter(m, "synapse_cache_errors_total", layer="embedder") == 1
    c.store(decision, answer("served by a backend"))
    await c.drain()
    assert (await c.lookup(chat(PASSWORD))).status == "hit-exact"   # L1 still works
    await c.close()


async def test_redis_killed_is_a_counted_miss(node_address, milvus_lite_path, redis_server):
    # a second for each Redis call: the hit before the kill must not run out of time on a
    # loaded machine; after the kill the lookup is a miss within that budget
    store = l1.RedisL1(redis_server.url, timeout_s=1.0)
    c, m = await build_cache(node_address, milvus_lite_path, store=store, l1_budget_s=1.0)
    await remember(c, chat(PASSWORD), "cached")
    assert (await c.lookup(chat(PASSWORD))).status == "hit-exact"
    redis_server.kill()
    assert (await c.lookup(chat(PASSWORD))).status == "miss"
    assert counter(m, "synapse_cache_errors_total", layer="exact") >= 1
    await c.close()


async def test_milvus_unavailable_is_a_counted_miss(node_address, tmp_path: pathlib.Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where Milvus needs a folder")
    c, m = await build_cache(node_address, str(blocker / "l2.db"))
    decision = await c.lookup(chat(PASSWORD))
    assert decision.status == "miss"
    assert counter(m, "synapse_cache_errors_total", layer="semantic") == 1
    c.store(decision, answer("cached in L1 only"))
    await c.drain()
    assert (await c.lookup(chat(PASSWORD))).status == "hit-exact"
    with pytest.raises(errors.Unavailable, match="semantic layer") as info:
        await c.invalidate(everything=True)     # the admin hears which layer failed
    assert "removed 1 exact" in str(info.value)
    assert (await c.lookup(chat(PASSWORD))).status == "miss"
    await c.close()


async def test_a_write_burst_beyond_the_queue_is_dropped_not_waited_for(node_address,
                                                                      milvus_lite_path):
    c, m = await build_cache(node_address, milvus_lite_path, store_queue_max=2)
    decisions = [await c.lookup(chat(f"question number {i}")) for i in range(4)]
    for d in decisions:         # no await in between: the writer has not run yet
        c.store(d, answer("x"))
    assert counter(m, "synapse_cache_errors_total", layer="writer") == 2
    await c.drain()
    hits = [(await c.lookup(chat(f"question number {i}"))).status for i in range(4)]
    assert hits == ["hit-exact", "hit-exact", "miss", "miss"]
    assert counter(m, "synapse_cache_stores_total", layer="semantic") == 2   # one batch
    await c.close()


async def test_a_model_with_a_stricter_target_precision_gets_fewer_semantic_hits(
        node_address, milvus_lite_path):
    c, _ = await build_cache(node_address, milvus_lite_path,
                             model_target_precision={"strict": 0.95})
    for model in ("llama", "strict"):
        await remember(c, chat(PASSWORD, model=model), f"answer for {model}")
    assert (await c.lookup(chat(PARAPHRASE, model="llama"))).status == "hit-semantic"
    assert (await c.lookup(chat(PARAPHRASE, model="strict"))).status == "miss"
    assert (await c.lookup(chat(PASSWORD, model="strict"))).status == "hit-exact"
    await c.close()


async def test_a_lookup_in_an_empty_scope_does_not_wait_for_an_embedding(cache):
    c, m = cache
    await remember(c, chat(PASSWORD), "first")       # learns the embedder id
    embedded = counter(m, "synapse_embedding_duration_seconds_count")
    other_scope = chat(PASSWORD, system="A conversation never seen before.")
    decision = await c.lookup(other_scope)
    assert decision.status == "miss"
    assert counter(m, "synapse_embedding_duration_seconds_count") == embedded
    c.store(decision, answer("second"))              # the writer embeds it instead
    await c.drain()
    para = await c.lookup(chat(PARAPHRASE, system="A conversation never seen before."))
    assert para.status == "hit-semantic" and para.hit.response["choices"][0]["message"][
        "content"] == "second"


def test_failures_are_logged_once_per_interval_with_a_count_of_the_rest(caplog):
    now = [0.0]
    errors_log = cache_budget.ErrorLog(60.0, lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="synapse.cache"):
        for _ in range(3):
            errors_log.report("exact", "lookup", ConnectionError("redis down"))
        now[0] = 61.0
        errors_log.report("exact", "lookup", TimeoutError())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "ConnectionError: redis down" in lines[0]
    assert "timed out" in lines[1] and "2 more" in lines[1]


async def test_a_stream_form_learnt_from_one_tenant_never_shapes_anothers_replays(cache):
    """An answer stored from a plain request replays in the form its model streamed in,
    learnt per tenant: one tenant's stream (its fields, whatever it asked the engine to
    echo) never shapes another's replays."""
    c, _ = cache
    form = {"content": {"id": "", "object": "chat.completion.chunk", "created": 0,
                        "model": "llama", "prompt_text": None,
                        "choices": [{"index": 0, "delta": {"content": ""},
                                     "logprobs": None, "finish_reason": None}]}}
    bob = await c.lookup(chat("What does bob stream?", tenant="bob"))
    assert bob.status == "miss"
    c.store(bob, stream_fold.Assembled(answer("Streamed for bob."), form))
    await c.drain()
    await remember(c, chat("What does alice ask?", tenant="alice"), "Plain for alice.")
    alice = await c.lookup(chat("What does alice ask?", tenant="alice"))
    assert alice.status == "hit-exact" and alice.hit is not None
    assert alice.hit.form is None               # the default form, not bob's
    await remember(c, chat("What else does bob ask?", tenant="bob"), "Plain for bob.")
    own = await c.lookup(chat("What else does bob ask?", tenant="bob"))
    assert own.hit is not None and own.hit.form == form    # bob's own model's form


async def test_entries_stored_without_a_lookup_are_embedded_for_their_own_tenant(
        cache, monkeypatch):
    """The agent keeps what it embeds in the calling tenant's part of its cache, so the
    writer embeds each tenant's entries in a call made for that tenant, never one call
    for several (whose texts would then share one part)."""
    from controlplane.adapters import embedder as embedder_mod

    c, _ = cache
    calls: list[tuple[str, int]] = []
    real = embedder_mod.NodeEmbedder.embed

    async def recording(self, texts, timeout_s=None, tenant=""):
        calls.append((tenant, len(texts)))
        return await real(self, texts, timeout_s=timeout_s, tenant=tenant)

    monkeypatch.setattr(embedder_mod.NodeEmbedder, "embed", recording)
    for tenant, question in (("acme", "How do I rotate keys?"), ("beta", "How do I sleep?"),
                             ("acme", "How do I revoke keys?")):
        request = chat(question, tenant=tenant, cache_control="no-cache")  # no lookup embed
        decision = await c.lookup(request)
        c.store(decision, answer(f"Answer for {tenant}."))
    await c.drain()
    assert calls and {t for t, _ in calls} == {"acme", "beta"}
    assert sum(n for _, n in calls) == 3
