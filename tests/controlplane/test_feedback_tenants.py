"""``calibrate --from-feedback`` against tenants that are adversaries of each other.

A model's operating point is shared by every tenant of the model, so one tenant's verdicts
must not move it for the others either way: a flood of "right" verdicts must not loosen it
(nor drown the others' "wrong" verdicts once several tenants send them), a flood of false
"wrong" verdicts must not raise it to "never accept" and switch the semantic cache off for
everyone; verdicts that agree across tenants still move it both ways. Same constructed
verifier and real command as ``test_verifier_feedback``.
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
    # four tenants find one hit in four wrong (below the 0.90 target): the point should rise
    honest_four = ("alice", "bob", "carol", "dave")
    write_judged(fb, model, [("llama", s, 0 if (i // 4) % 4 == 0 else 1)
                             for i, s in enumerate(just_above(base, 80, 1))],
                 tenants=honest_four)
    write_judged(fb, model, [("llama", s, 1) for s in just_above(base, 300, 2)],
                 tenants=("mallory",))

    new, out = refit(capsys, tmp_path, path)
    assert new.threshold_for(0.90, "llama") > base
    mallory = next(line for line in out.splitlines() if "mallory" in line and "capped" in line)
    assert mallory.split()[1:6] == ["mallory", "300", "0", "26", "274"]

    # pooled as equals (the behaviour before tenants were told apart), mallory loosens it
    pooled, _ = refit(capsys, tmp_path, path, "--min-tenants", "1", "--max-tenant-share", "1")
    assert pooled.threshold_for(0.90, "llama") < base


def test_against_two_honest_tenants_a_flood_of_right_verdicts_holds_the_point(
        judge, tmp_path, capsys):
    # Two tenants cannot be told from one liar and one honest tenant (each one's leave-out
    # is the other plus mallory), so the rise is not applied: nor is mallory's loosening.
    model, path = judge
    base = model.threshold_for(0.90)
    fb = tmp_path / "fb.jsonl"
    write_judged(fb, model, honest(base, 20, 4, seed=1), tenants=("alice", "bob"))
    write_judged(fb, model, [("llama", s, 1) for s in just_above(base, 300, 2)],
                 tenants=("mallory",))

    new, out = refit(capsys, tmp_path, path)
    assert new.threshold_for(0.90, "llama") == base
    assert "capped at 20" in out
    assert "llama: kept at 0.8333" in out and "without tenant 'alice', or 'bob'" in out


def test_a_lone_tenant_moves_the_point_neither_way(judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    write_judged(tmp_path / "fb.jsonl", model,
                 [("llama", s, 1) for s in just_above(base, 300, 2)]
                 + [("qwen", s, 0 if i % 3 == 0 else 1)
                    for i, s in enumerate(just_above(base, 150, 3))], tenants=("mallory",))

    new, out = refit(capsys, tmp_path, path)
    assert new.threshold_for(0.90, "llama") == base
    assert new.threshold_for(0.90, "qwen") == base
    assert "llama: kept at" in out and "qwen: kept at" in out
    assert "needs 2 (--min-tenants)" in out

    trusting, _ = refit(capsys, tmp_path, path, "--min-tenants", "1")
    assert trusting.threshold_for(0.90, "llama") < base < trusting.threshold_for(0.90, "qwen")


def false_wrong(n: int, seed: int) -> list[tuple[str, float, int]]:
    """``n`` hits of llama the verifier was all but sure of (0.97 to 1.0), judged wrong."""
    rng = np.random.default_rng(seed)
    return [("llama", float(s), 0) for s in rng.uniform(0.97, 1.0, n)]


def test_one_tenant_flooding_wrong_verdicts_does_not_switch_the_cache_off(
        judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    fb = tmp_path / "fb.jsonl"
    write_judged(fb, model, false_wrong(200, seed=8), tenants=("mallory",))

    alone, out = refit(capsys, tmp_path, path)
    assert alone.threshold_for(0.90, "llama") == base
    assert "needs 2 (--min-tenants)" in out

    # a victim judging its own hits right: they are all still served afterwards
    victim = just_above(base, 40, 9)
    write_judged(fb, model, [("llama", s, 1) for s in victim], tenants=("victim",))
    both, out = refit(capsys, tmp_path, path)
    threshold = both.threshold_for(0.90, "llama")
    assert threshold == base and all(s >= threshold for s in victim)
    assert "without tenant 'mallory' does not raise it" in out
    assert "q0" not in out and "e0" not in out      # tenant names, never prompts

    # trusting every tenant as one, mallory's verdicts would stop the cache for everyone
    pooled, _ = refit(capsys, tmp_path, path, "--min-tenants", "1")
    assert not any(s >= pooled.threshold_for(0.90, "llama") for s in victim)


def test_wrong_verdicts_broad_across_tenants_raise_the_point_only_as_far_as_they_agree(
        judge, tmp_path, capsys):
    model, path = judge
    base = model.threshold_for(0.90)
    fb = tmp_path / "fb.jsonl"
    honest_three = ("alice", "bob", "carol")
    # each of three tenants finds one hit in three wrong just above the point
    write_judged(fb, model, [("llama", s, 0 if (i // 3) % 3 == 0 else 1)
                             for i, s in enumerate(just_above(base, 150, 5))],
                 tenants=honest_three)
    without_mallory, _ = refit(capsys, tmp_path, path)
    honest_point = without_mallory.threshold_for(0.90, "llama")
    assert honest_point > base + 0.02       # genuine wrong answers, broadly seen: it rises

    write_judged(fb, model, false_wrong(200, seed=8), tenants=("mallory",))
    new, out = refit(capsys, tmp_path, path)
    threshold = new.threshold_for(0.90, "llama")
    # as far as the honest tenants' verdicts take it, not to mallory's "never accept"
    assert base < threshold < 0.95
    assert abs(threshold - honest_point) < 0.005
    assert "without tenant 'mallory' goes no higher" in out


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
