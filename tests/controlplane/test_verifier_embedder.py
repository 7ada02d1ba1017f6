"""Which verifier judges which embedder's vectors, and a mismatch refused at start.

The verifier's features and operating point mean nothing on another embedder's vectors.
When the operator names a verifier or an embedder, ``cache.embedder_id`` (by default the
untuned all-MiniLM-L6-v2's id, what agents serve by default) must be the id the verifier
file names. A file that names none is older than the field and was fitted on the untuned
model. With neither setting, the shipped verifier judges the untuned MiniLM's vectors and
the older shipped one any other embedder's. Checked on the settings, on the cache and on
a real ``synapse controlplane``.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import pytest
import yaml

from controlplane import config, feedback_wiring
from controlplane.core import verifier
from synapse_common import embedder_tuning
from tests import harness
from tests.controlplane import test_cache_support as support
from tests.controlplane.test_cache_support import build_cache, chat, counter, remember

node_address = support.node_address       # fixture: a real Node.Embed server

PLAIN_ID = embedder_tuning.base_id()
TUNED_ID = f"{PLAIN_ID}+tuned-0123456789ab"


def verifier_for(tmp_path: pathlib.Path, embedder_id: str) -> str:
    model = verifier.load()
    model.meta["embedder_id"] = embedder_id
    path = tmp_path / f"verifier-{len(embedder_id)}.json"
    model.save(path)
    return str(path)


def cache(**fields: object) -> config.CacheSettings:
    return config.CacheSettings.model_validate(fields)


def load(c: config.CacheSettings) -> verifier.Verifier:
    """The one verifier a pinned configuration judges with."""
    judges, pinned = feedback_wiring.load_judges(c)
    assert judges.others is None and pinned == judges.fitted.embedder_id
    return judges.fitted


def test_by_default_each_embedder_is_judged_by_the_verifier_shipped_for_it():
    judges, pinned = feedback_wiring.load_judges(cache())
    shipped, older = verifier.load(), verifier.load(verifier.ANY_EMBEDDER_PATH)
    assert pinned == "" and shipped.embedder_id == PLAIN_ID and older.embedder_id == ""
    plain = judges.for_embedder(PLAIN_ID)       # stacked on the pair scorer by default
    assert plain.base_digest == shipped.digest and plain.stack is not None
    for other in (TUNED_ID, "BAAI/bge-small-en-v1.5@tei-1.8.0", ""):
        assert judges.for_embedder(other).digest == older.digest != shipped.digest
    assert shipped.feature_version == 2 and older.feature_version == 1


def test_naming_the_embedder_pins_the_cache_to_the_shipped_verifier():
    assert load(cache(embedder_id=PLAIN_ID)).base_digest == verifier.load().digest
    assert load(cache(embedder_id=PLAIN_ID, pair_scorer=False)).digest == verifier.load().digest
    with pytest.raises(feedback_wiring.VerifierConfigError, match=re.escape(TUNED_ID)):
        feedback_wiring.load_judges(cache(embedder_id=TUNED_ID))


def test_a_verifier_for_another_embedder_is_refused_naming_the_settings(tmp_path):
    path = verifier_for(tmp_path, TUNED_ID)
    with pytest.raises(feedback_wiring.VerifierConfigError) as refused:
        feedback_wiring.load_judges(cache(verifier_path=path))
    message = str(refused.value)
    assert message.startswith("cache.verifier_path: ") and path in message
    assert PLAIN_ID in message and TUNED_ID in message and "cache.embedder_id" in message
    # Saying which embedder the agents serve makes the same file acceptable.
    ok = load(cache(verifier_path=path, embedder_id=TUNED_ID))
    assert ok.embedder_id == TUNED_ID


def test_a_verifier_for_the_plain_embedder_is_refused_for_a_tuned_one(tmp_path):
    path = verifier_for(tmp_path, PLAIN_ID)
    assert load(cache(verifier_path=path)).embedder_id == PLAIN_ID
    with pytest.raises(feedback_wiring.VerifierConfigError, match=re.escape(TUNED_ID)):
        feedback_wiring.load_judges(cache(verifier_path=path, embedder_id=TUNED_ID))


def test_the_control_plane_does_not_start_with_a_mismatched_verifier(tmp_path):
    cfg = {"data_dir": str(tmp_path / "data"), "http": {"host": "127.0.0.1", "port": 0},
           "grpc": {"host": "127.0.0.1", "port": 0},
           "auth": {"allow_unauthenticated_agents": True},
           "cache": {"verifier_path": verifier_for(tmp_path, TUNED_ID)}}
    path = tmp_path / "cp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([harness.console_script("synapse"), "controlplane", "--config",
                           str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("config error: cache.verifier_path: ") and TUNED_ID in line


async def test_vectors_of_another_embedder_are_not_judged(node_address, milvus_lite_path):
    # The agent serves plain all-MiniLM-L6-v2; the cache expects another embedder's
    # vectors: every semantic lookup fails open (a miss), counted as an embedder error.
    c, m = await build_cache(node_address, milvus_lite_path, embedder_id="some-other@1")
    try:
        await remember(c, chat("How do I reset my password?"), "Use the reset link.")
        assert (await c.lookup(chat("How can I reset my password?"))).status == "miss"
        assert counter(m, "synapse_cache_errors_total", layer="embedder") >= 1
        assert (await c.lookup(chat("How do I reset my password?"))).status == "hit-exact"
    finally:
        await c.close()


@pytest.mark.parametrize("fitted_for", [PLAIN_ID, TUNED_ID])
async def test_a_hit_is_judged_by_the_verifier_of_the_embedder_it_was_embedded_with(
        node_address, milvus_lite_path, tmp_path, fitted_for):
    # The agent serves the untuned MiniLM: the verifier fitted for it judges, and the one
    # for any other embedder judges when the first was fitted for another. The hit names
    # the verifier that accepted it (feedback compares scores of one verifier only).
    fitted = verifier.load(verifier_for(tmp_path, fitted_for))
    others = verifier.load(verifier.ANY_EMBEDDER_PATH)
    c, _ = await build_cache(node_address, milvus_lite_path,
                             judges=verifier.Judges(fitted, others))
    try:
        await remember(c, chat("How do I reset my password?"), "Use the reset link.")
        hit = (await c.lookup(chat("How can I reset my password?"))).hit
        assert hit is not None and hit.layer == "semantic" and hit.source is not None
        judge = fitted if fitted_for == PLAIN_ID else others
        assert (hit.source.verifier, hit.source.embedder_id) == (judge.digest, PLAIN_ID)
        assert hit.score >= judge.threshold
    finally:
        await c.close()


def test_cache_pair_scorer_stacks_the_shipped_verifier_for_minilm_only():
    judges, pinned = feedback_wiring.load_judges(cache(pair_scorer=True))
    shipped = verifier.load()
    plain = judges.for_embedder(PLAIN_ID)
    assert pinned == "" and plain.stack is not None
    assert plain.base_digest == shipped.digest and plain.digest != shipped.digest
    assert judges.for_embedder(TUNED_ID).stack is None    # other embedders: as before
    alone, _ = feedback_wiring.load_judges(cache(pair_scorer=False))
    assert alone.for_embedder(PLAIN_ID).stack is None
    assert alone.for_embedder(PLAIN_ID).digest == shipped.digest


def test_a_stack_for_another_verifier_stops_the_control_plane(tmp_path):
    stale = tmp_path / "stack.json"
    data = json.loads(verifier.STACK_PATH.read_text())
    data["base_digest"] = "0123456789abcdef"        # fitted on a verifier since refitted
    stale.write_text(json.dumps(data))
    with pytest.raises(feedback_wiring.VerifierConfigError,
                       match=r"cache.pair_scorer: the stack in .* was fitted on verifier"):
        feedback_wiring.load_judges(cache(pair_scorer=True), stale)
