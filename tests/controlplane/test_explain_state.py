"""``explain`` (``synapsectl explain``, ``Admin.ExplainRoute``) shows the next routing
decision and moves none of the router's state: the rotation of ties, the ledger, the
prefix index, session affinity. Before, it ran ``route()`` and so advanced the rotation:
an operator explaining a request changed where the next real request went."""

from __future__ import annotations

from controlplane.core import ledger, prefix_index, registry, router, types
from tests.clock import ManualClock

MODEL = "m"


def _router(policy: str) -> tuple[router.Router, prefix_index.PrefixIndex]:
    reg = registry.Registry(ManualClock(), 15.0)
    reg.register(types.NodeInfo("n1"))
    reg.report("n1", [types.BackendState(key=f"n1/{n}", node="n1", name=n, url=f"http://{n}",
                                         models=(MODEL,), kv_capacity_tokens=100_000,
                                         block_size=16) for n in ("a", "b", "c")])
    index = prefix_index.PrefixIndex(200_000)
    return router.Router(router.Params(policy=policy), reg, ledger.Ledger(), index), index


def _chosen(verdicts: list[types.Verdict]) -> str:
    return next(v.backend.name for v in verdicts if v.rank == 1)


def test_explain_names_the_backend_the_next_request_gets_and_moves_nothing() -> None:
    for policy in ("predicted_ttft", "round_robin"):
        r, index = _router(policy)
        prompt = router.Prompt.from_text("hello there", 8, "sess-1")
        served = []
        for _ in range(4):   # idle, identical backends: ties rotate
            explained = [_chosen(r.explain(MODEL, prompt)[0]) for _ in range(3)]
            decision = r.route(MODEL, prompt)
            assert decision is not None
            served.append(decision.candidates[0].backend.name)
            assert explained == [served[-1]] * 3, (policy, explained, served)
        assert served == ["a", "b", "c", "a"], policy
        assert all(load.in_flight == 0 for load in r.ledger.snapshot().values())
        assert all(index.size(f"n1/{n}") == 0 for n in "abc")


def test_explain_does_not_record_session_affinity_or_prefix_blocks() -> None:
    r, index = _router("predicted_ttft")
    prompt = router.Prompt.from_text("a question " * 50, 8, "sess-2")
    for _ in range(5):
        verdicts, _ = r.explain(MODEL, prompt)
        assert not any(v.session_affinity or v.cached_tokens for v in verdicts)
    assert all(index.size(f"n1/{n}") == 0 for n in "abc")
