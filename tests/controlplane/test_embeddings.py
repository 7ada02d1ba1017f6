"""``controlplane.api.embeddings``: the answer built for an agent embedder's vectors."""

from __future__ import annotations

import numpy as np

from controlplane.api import embeddings
from controlplane.core import cache_salt, tokenization
from controlplane.core import router as router_mod
from synapse_common import tokens as tok


def _prompt(texts: list[str], tenant: str) -> router_mod.Prompt:
    prompt = router_mod.Prompt.from_text(" ".join(texts), 0, "", exact=False)
    prompt.partition(cache_salt.for_tenant(tenant, None, b"k" * 32))
    return prompt


def test_the_usage_count_of_an_agents_embeddings_finds_no_other_tenants_pieces() -> None:
    """The count runs on every agent-embedder answer: from a memo of pieces that all
    tenants shared, tenant a's count of a text tenant b had sent was measurably faster
    (a hit on each of its pieces) than of a wrong guess. Counted in each tenant's own."""
    secret = ["zqxv wplk the merger of tenant b", "and its qzzj second text"]
    vectors = [np.zeros(2, dtype=np.float32)] * 2
    theirs = _prompt(secret, "tenant b")
    answer = embeddings._openai_body("m", secret, vectors, {}, theirs)
    assert answer["usage"]["prompt_tokens"] == sum(len(tok.pieces(t)) for t in secret)
    assert "zqxv" in tokenization._pieces_of(theirs.hash_seed)
    assert "zqxv" not in tok._IDS, "counted in the memo every tenant shares"
    mine = _prompt(secret, "tenant a")
    assert "zqxv" not in tokenization._pieces_of(mine.hash_seed)
    assert embeddings._openai_body("m", secret, vectors, {}, mine)["usage"] == answer["usage"]
