"""The bundled MiniLM loads offline and quietly: a service's log is not a terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LOAD_BOTH = """
from synapse_common import minilm, pair_scorer_model
pair_scorer_model.build()       # first: it imports transformers itself
pair_scorer_model.tokenizer()
minilm.load()
print("loaded")
"""


def test_loading_the_weights_draws_no_progress_bar_and_fetches_nothing() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", LOAD_BOTH], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded"
    assert "Loading weights" not in done.stderr
    assert "%|" not in done.stderr     # no tqdm bar of any kind


def test_an_operators_own_setting_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from synapse_common import minilm

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    minilm.go_offline()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
