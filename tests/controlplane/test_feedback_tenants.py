"""``calibrate --from-feedback`` against tenants that are adversaries of each other.

A model's operating point is shared by every tenant of the model, so one tenant flooding
"right" verdicts on its own hits must not loosen it for the others (nor drown the others'
"wrong" verdicts), while honest verdicts from several tenants still move it, and wrong
verdicts raise it whoever sends them. Same constructed verifier and real command as
``test_verifier_feedback``.
"""

from __future__ import annotations

import json

import numpy as np

from controlplane import feedback_calibrate
from controlplane.core import verifier
from tests.controlplane.test_verifier_feedback import calibrate, judge, write_judged

__all__ = ["judge"]     # the fixture, used by name


def just_above(base: float, n: int, seed: int) -> list[float]:
    return [float(s) for s in np.random.default_rng(seed).uniform(base, min(1.0, base + 0.05),
                                                                  n)]


def refit(capsys, tmp_path, path, *options: str) -> tuple[verifier.Verifier, str]:
    code, out, err = calibrate(capsys, "--from-feedback", str(tmp_path / "fb.jsonl"),
                               "--verifier", str(path), "--out", str(tmp_path / "new.json"),
                               *options)
    assert code == 0, err
    return verifier.load(tmp_path / "new.json"), out


def honest(base: float, per_tenant: int, wrong_every: int, seed: int
           ) -> list[tuple[str, float, int]]:
    """``per_tenant`` hits of llama for each of alice and bob (interleaved), one in
    ``wrong_every`` judged wrong, each tenant alike."""
    scores = just_above(base, 2 * per_tenant, seed)
    return [("llama", s, 0 if (i // 2) % wrong_every == 0 else 1) for i, s in enumerate(scores)]


def test_one_tenant_flooding_right_verdicts_does_not_loosen_the_point(judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    fb = tmp_path / "fb.jsonl"
    # alice and bob find one hit in four wrong (below the 0.90 target): the point should rise
    write_judged(fb, model, honest(base, 20, 4, seed=1), tenants=("alice", "bob"))
    write_judged(fb, model, [("llama", s, 1) for s in just_above(base, 300, 2)],
                 tenants=("mallory",))

    new, out = refit(capsys, tmp_path, path)
    assert new.threshold_for(0.90, "llama") > base
    assert "capped at 20" in out and "mallory" in out
    mallory = next(line for line in out.splitlines() if "mallory" in line and "capped" in line)
    assert mallory.split()[1:6] == ["mallory", "300", "0", "20", "280"]
    assert "without tenant 'mallory'" in out

    # pooled as equals (the behaviour before tenants were told apart), mallory loosens it
    pooled, _ = refit(capsys, tmp_path, path, "--min-tenants", "1", "--max-tenant-share", "1")
    assert pooled.threshold_for(0.90, "llama") < base


def test_a_lone_tenant_cannot_loosen_the_point_but_its_wrong_verdicts_raise_it(
        judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    write_judged(tmp_path / "fb.jsonl", model,
                 [("llama", s, 1) for s in just_above(base, 300, 2)]
                 + [("qwen", s, 0 if i % 3 == 0 else 1)
                    for i, s in enumerate(just_above(base, 150, 3))], tenants=("mallory",))

    new, out = refit(capsys, tmp_path, path)
    assert new.threshold_for(0.90, "llama") == base
    assert new.threshold_for(0.90, "qwen") > base
    assert "llama: kept at" in out and "needs 2 (--min-tenants)" in out
    assert "qwen: kept" not in out

    trusting, _ = refit(capsys, tmp_path, path, "--min-tenants", "1")
    assert trusting.threshold_for(0.90, "llama") < base


def test_honest_tenants_still_move_the_point_both_ways(judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    tenants = ("alice", "bob", "carol", "dave")
    hits = [("lenient", s, 1) for s in just_above(base, 160, 4)]
    hits += [("strict", s, 0 if (i // 4) % 3 == 0 else 1)
             for i, s in enumerate(just_above(base, 160, 5))]
    write_judged(tmp_path / "fb.jsonl", model, hits, tenants=tenants)

    new, out = refit(capsys, tmp_path, path)
    assert new.threshold_for(0.90, "lenient") < base < new.threshold_for(0.90, "strict")
    assert "capped at" not in out
    for tenant in tenants:
        assert any(line.split()[:6] == ["lenient", tenant, "40", "0", "40", "0"]
                   for line in out.splitlines())
    # about where pooling every verdict as equals puts it (leaving one tenant out of four
    # alike changes little)
    pooled, _ = refit(capsys, tmp_path, path, "--min-tenants", "1")
    for name in ("lenient", "strict"):
        assert abs(new.threshold_for(0.90, name) - pooled.threshold_for(0.90, name)) < 0.01


def test_the_cap_is_settable_and_recorded(judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    write_judged(tmp_path / "fb.jsonl", model, honest(base, 20, 4, seed=1),
                 tenants=("alice", "bob"))
    write_judged(tmp_path / "fb.jsonl", model,
                 [("llama", s, 1) for s in just_above(base, 300, 2)], tenants=("mallory",))

    _, out = refit(capsys, tmp_path, path, "--max-tenant-share", "0.5")
    assert "no tenant counts for over 50%" in out
    assert "capped at 40 (50% of 80 counted)" in out
    meta = json.loads((tmp_path / "new.json").read_text())["feedback"]
    assert (meta["max_tenant_share"], meta["min_tenants"]) == (0.5, 2)

    code, _, err = calibrate(capsys, "--from-feedback", str(tmp_path / "fb.jsonl"),
                             "--verifier", str(path), "--out", str(tmp_path / "x.json"),
                             "--max-tenant-share", "0")
    assert code == 2 and "--max-tenant-share" in err


def test_verdicts_recorded_without_a_tenant_count_as_one_tenant(judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    rows = [{"model": "llama", "score": s, "label": 1, "verifier": model.digest}
            for s in just_above(base, 150, 6)]
    (tmp_path / "fb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    new, out = refit(capsys, tmp_path, path)
    assert new.threshold_for(0.90, "llama") == base
    assert feedback_calibrate.NO_TENANT in out


def test_the_cap_leaves_no_tenant_over_its_share():
    assert feedback_calibrate.tenant_cap([1000, 10, 10], 0.25) == 10     # equal split of 3
    assert feedback_calibrate.tenant_cap([1000, 100, 100, 100, 100], 0.25) == 133
    assert feedback_calibrate.tenant_cap([30, 30, 30, 30], 0.25) is None
    assert feedback_calibrate.tenant_cap([500], 0.25) is None            # alone: no one to cap
