"""The router: filter, predicted-TTFT order, prefix affinity vs load, policies, explain."""

from __future__ import annotations

import dataclasses

from controlplane.core import ledger, prefix_index, registry, router, tenant_lru, types
from tests.clock import ManualClock

MODEL = "m"
LONG = "shared context about the quarterly report. " * 200   # ~2,000 tokens


def backend(name: str, **kw: object) -> types.BackendState:
    base = dict(key=f"n1/{name}", node="n1", name=name, url=f"http://{name}", models=(MODEL,),
                kv_capacity_tokens=100_000, block_size=16)
    return types.BackendState(**{**base, **kw})  # type: ignore[arg-type]


def make(policy: str = "predicted_ttft",
         *backends: types.BackendState) -> tuple[router.Router, registry.Registry]:
    reg = registry.Registry(ManualClock(), 15.0)
    reg.register(types.NodeInfo("n1"))
    reg.report("n1", backends or [backend("a"), backend("b"), backend("c")])
    r = router.Router(router.Params(policy=policy), reg, ledger.Ledger(),
                      prefix_index.PrefixIndex(200_000))
    return r, reg


def ask(text: str, session: str = "") -> router.Prompt:
    return router.Prompt.from_messages([{"role": "system", "content": LONG},
                                        {"role": "user", "content": text}], 64, session)


def test_a_shared_prefix_goes_back_to_the_backend_that_holds_it() -> None:
    r, _ = make()
    first = r.route(MODEL, ask("question one"))
    assert first is not None
    r.ledger.finish(r.dispatched(first, first.candidates[0], ask("question one")))
    again = r.route(MODEL, ask("another question"))
    assert again is not None
    chosen = again.candidates[0]
    assert chosen.backend.key == first.candidates[0].backend.key
    assert chosen.cached_tokens > 1500 and again.reason.startswith("prefix-hit")
    assert chosen.prefill_s < again.candidates[1].prefill_s


def test_a_saturated_holder_loses_to_an_idle_backend() -> None:
    r, _ = make()
    first = r.route(MODEL, ask("q"))
    assert first is not None
    holder = first.candidates[0]
    r.dispatched(first, holder, ask("q"))
    for _ in range(40):  # 40 long unique prompts queued on the holder, none finished
        r.ledger.dispatch(holder.backend.key, 2000, 2000)
    again = r.route(MODEL, ask("q2"))
    assert again is not None
    assert again.candidates[0].backend.key != holder.backend.key
    held = next(v for v in again.candidates if v.backend.key == holder.backend.key)
    assert held.cached_tokens > 0 and held.queue_wait_s > again.candidates[0].predicted_ttft_s


def test_filter_drops_unready_and_kv_too_small_backends() -> None:
    r, reg = make("predicted_ttft", backend("ok"), backend("starting", phase="starting"),
                  backend("tiny", kv_capacity_tokens=500))
    verdicts, _ = r.verdicts(MODEL, ask("x"))
    why = {v.backend.name: v.filter_reason for v in verdicts}
    assert why["ok"] == ""
    assert why["starting"] == "backend starting"
    assert "capacity 500" in why["tiny"]
    decision = r.route(MODEL, ask("x"))
    assert decision is not None and [v.backend.name for v in decision.candidates] == ["ok"]
    reg.cordon("n1")
    assert r.route(MODEL, ask("x")) is None


def test_a_prompt_no_kv_cache_can_hold_is_not_hashed_for_that_backend() -> None:
    # hashing a huge prompt is most of its CPU: a backend that can never hold it is
    # refused on its size alone (a tenant's oversized bodies stay cheap to refuse)
    r, _ = make("predicted_ttft", backend("ok"), backend("tiny", kv_capacity_tokens=500))
    sizes: list[int] = []
    real = r._hashes
    r._hashes = lambda ids, bs, seed=0: sizes.append(len(ids)) or real(ids, bs, seed)  # type: ignore[assignment,method-assign,func-returns-value]
    verdicts, _ = r.verdicts(MODEL, ask("x"))
    assert len(sizes) == 1      # the one block size, for "ok" only
    r._index.insert("n1/tiny", real(ask("x").token_ids, 16), 0, 0)
    verdicts, _ = r.verdicts(MODEL, ask("x"))
    tiny = next(v for v in verdicts if v.backend.name == "tiny")
    assert tiny.cached_tokens == 0 and "capacity 500" in tiny.filter_reason
    r2, _ = make("predicted_ttft", backend("tiny", kv_capacity_tokens=500))
    r2._hashes = lambda ids, bs, seed=0: sizes.append(len(ids)) or real(ids, bs, seed)  # type: ignore[assignment,method-assign,func-returns-value]
    assert r2.route(MODEL, ask("x")) is None and len(sizes) == 2


def test_all_kv_full_still_routes_so_the_engine_can_queue() -> None:
    r, _ = make("predicted_ttft", backend("a", kv_usage=0.999), backend("b", kv_usage=0.999))
    decision = r.route(MODEL, ask("x"))
    assert decision is not None and "kv-overcommit" in decision.reason


def test_session_breaks_ties_toward_its_backend() -> None:
    r, _ = make()
    short = router.Prompt.from_text("hello", 8, "sess-1")
    first = r.route(MODEL, short)
    assert first is not None
    pick = first.candidates[-1]  # not the natural first choice
    r.ledger.finish(r.dispatched(first, pick, short))
    for _ in range(3):
        again = r.route(MODEL, short)
        assert again is not None
        assert again.candidates[0].backend.key == pick.backend.key
        assert again.reason == "session"


def test_session_keys_are_per_tenant_and_never_collide() -> None:
    assert router.session_key("a", "") == ""                      # no session
    keys = {router.session_key(t, s) for t, s in [
        ("a", "u"), ("b", "u"), ("a:1", "u"), ("a", "1:u"), ("", "u")]}
    assert len(keys) == 5


def test_one_tenants_sessions_never_push_out_anothers() -> None:
    r, _ = make()
    r.sessions = tenant_lru.TenantLRU(10, tenants=2)    # as services builds it
    victim = router.session_key("b", "user-1")
    r.remember_session(victim, "n1/b")
    for i in range(1000):
        r.remember_session(router.session_key("a", f"user-{i}"), "n1/a")
    assert r.sessions.peek("b", victim) == "n1/b"
    verdicts, _ = r.verdicts(MODEL, ask("hello", victim))
    assert [v.backend.key for v in verdicts if v.session_affinity] == ["n1/b"]
    assert r.sessions.peek("a", router.session_key("a", "user-994")) is None  # a's share: 5
    assert r.sessions.peek("a", router.session_key("a", "user-995")) == "n1/a"
    assert len(r.sessions) == 6 <= 10


def test_a_session_keys_tenant_is_the_tenant_it_was_made_with() -> None:
    for tenant, session in [("a", "u"), ("a:1", "u"), ("a", "1:u"), ("", "u"), ("é", "x")]:
        assert router.session_tenant(router.session_key(tenant, session)) == tenant
    assert router.session_tenant("not-a-key") == ""


def test_round_robin_and_least_loaded_policies() -> None:
    rr, _ = make("round_robin")
    p = router.Prompt.from_text("x", exact=False)
    seen = []
    for _ in range(6):
        d = rr.route(MODEL, p)
        assert d is not None
        seen.append(d.candidates[0].backend.name)
    assert seen == ["a", "b", "c", "a", "b", "c"]
    ll, _ = make("least_loaded")
    ll.ledger.dispatch("n1/a", 10, 10)
    ll.ledger.dispatch("n1/b", 10, 10)
    d = ll.route(MODEL, p)
    assert d is not None and d.candidates[0].backend.name == "c"


def test_explain_uses_the_same_score_as_routing() -> None:
    r, _ = make("predicted_ttft", backend("a"), backend("down", phase="failed"))
    verdicts, reason = r.explain(MODEL, ask("why"))
    by = {v.backend.name: v for v in verdicts}
    assert by["a"].rank == 1 and by["a"].eligible and reason
    assert by["down"].rank == 0 and by["down"].filter_reason == "backend failed"
    decision = r.route(MODEL, ask("why"))
    assert decision is not None
    assert dataclasses.replace(decision.candidates[0], rank=1).predicted_ttft_s == \
        by["a"].predicted_ttft_s
    assert by["a"].predicted_ttft_s == by["a"].queue_wait_s + by["a"].prefill_s


def test_prefix_index_forgets_beyond_the_backend_capacity() -> None:
    index = prefix_index.PrefixIndex(10_000)
    index.insert("b", list(range(100)), capacity_blocks=50)
    assert index.size("b") == 50
    assert index.match("b", list(range(100))) == 0  # the oldest (leading) blocks went first
    assert index.match("b", list(range(50, 100))) == 50
    index.insert("b", [1, 2], capacity_blocks=50, restarts=1)  # restarted: cache lost
    assert index.size("b") == 2


def test_memoised_block_hashes_are_the_engines_own() -> None:
    """The router hashes blocks it has seen from its memo: the hashes must stay the ones
    the engines' prefix caches compute, for prompts that share a prefix or not, in any
    block size, also once the memo was cleared for room."""
    import random

    from synapse_common import tokens as tok
    rng = random.Random(5)
    hasher = prefix_index.BlockHasher(max_blocks=50)
    shared = tuple(rng.randrange(2**31) for _ in range(200))
    for _ in range(500):
        ids = shared[:rng.randrange(200)] + tuple(rng.randrange(2**31)
                                                  for _ in range(rng.randrange(60)))
        size = rng.choice([1, 4, 16, 128])
        assert hasher(ids, size) == tuple(tok.block_hashes(ids, size))


def test_memoised_message_tokens_equal_tokenizing_the_whole_rendering() -> None:
    import random

    from synapse_common import tokens as tok
    rng = random.Random(3)
    alphabet = ["a", "bc", " ", "\n", "\t", "<", "|", ">", "é", "12", "  \n  ", "end"]
    for _ in range(200):
        messages = [{"role": rng.choice(["system", "user", "assistant"]),
                     "content": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))}
                    for _ in range(rng.randint(1, 4))]
        prompt = router.Prompt.from_messages(messages)
        assert list(prompt.token_ids) == tok.tokenize(tok.render_chat(messages))
