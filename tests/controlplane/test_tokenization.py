"""The router meets a real tokenizer: SmolLM2's tokenizer.json and chat template from the
engine tier (``make engines``), rendered and encoded as vLLM does, hashed in the engine's
block size; the approximation for models without one; explain says which."""

from __future__ import annotations

import pathlib
import random
import sys
import types as types_mod
from typing import Any

import pytest
import tokenizers

from controlplane.adapters import hf_tokenizer
from controlplane.core import ledger, prefix_index, registry, router, tokenization, types
from synapse_common import engines
from synapse_common import tokens as tok
from tests.clock import ManualClock

MODEL = "smollm2-135m-instruct"
OTHER = "approximated-model"
# What vLLM 0.32 (transformers' apply_chat_template) makes of the smoke question with
# SmolLM2-135M-Instruct: its template adds the default system prompt.
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
FRANCE_TEXT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
               "<|im_end|>\n<|im_start|>assistant\n")
FRANCE_IDS = (1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
              7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
              4649, 47, 2, 198, 1, 520, 9531, 198)


@pytest.fixture(scope="module")
def model_dir() -> str:
    """SmolLM2's HF directory from the engine tier; fails naming `make engines` without it."""
    return str(engines.find().require_model())


@pytest.fixture(scope="module")
def reference(model_dir: str) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(f"{model_dir}/tokenizer.json")


def test_a_chat_prompt_is_rendered_and_encoded_as_vllm_does(model_dir: str) -> None:
    hf = hf_tokenizer.load(model_dir)
    assert hf.render(FRANCE) == FRANCE_TEXT
    assert hf.chat_ids(FRANCE) == FRANCE_IDS
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    assert "the capital\nof France?" in hf.render(parts)  # text parts joined by newlines


def test_memoised_pieces_equal_one_encoding_of_the_whole_rendering(
        model_dir: str, reference: tokenizers.Tokenizer) -> None:
    hf = hf_tokenizer.load(model_dir)
    rng = random.Random(5)
    alphabet = ["a", "bc", " ", "\n", "  ", "é", "12", "<|im_start|>", "<|im_end|>", "end",
                "The quarterly report ", "🙂", "\t", "<", "|"]
    for _ in range(200):
        messages = [{"role": rng.choice(["system", "user", "assistant"]),
                     "content": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))}
                    for _ in range(rng.randint(1, 4))]
        whole = reference.encode(hf.render(messages), add_special_tokens=False).ids
        assert hf.chat_ids(messages) == tuple(whole)
        assert hf.chat_ids(messages) == tuple(whole)  # again, from the memo
        text = messages[0]["content"]
        assert hf.encode_prompt(text) == tuple(reference.encode(text).ids)


def test_a_model_tokenizers_memo_never_answers_one_tenant_with_anothers_pieces(
        model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo keeps a rendering's pieces (a message's text, mostly) per partition: a
    hit on a message another tenant sent would tell, by its speed, that it was sent."""
    hf = hf_tokenizer.load(model_dir)
    encoded: list[str] = []
    encode = hf._encode
    monkeypatch.setattr(hf, "_encode", lambda text: (encoded.append(text), encode(text))[1])
    secret = [{"role": "user", "content": "the merger closes on the ninth of March"}]
    first = hf.chat_ids(secret, partition=11)
    assert any("merger" in t for t in encoded)
    encoded.clear()
    assert hf.chat_ids(secret, partition=11) == first and not encoded   # its own: a hit
    assert hf.chat_ids(secret, partition=22) == first
    assert any("merger" in t for t in encoded), "another tenant was answered from the memo"


def _router(model_dir: str, block_size: int = 128) -> router.Router:
    reg = registry.Registry(ManualClock(), 15.0)
    reg.register(types.NodeInfo("n1"))
    reg.report("n1", [types.BackendState(
        key=f"n1/{name}", node="n1", name=name, url=f"http://{name}", models=(MODEL, OTHER),
        kv_capacity_tokens=45_000, block_size=block_size) for name in ("a", "b")])
    return router.Router(router.Params(), reg, ledger.Ledger(ManualClock()),
                         prefix_index.PrefixIndex(200_000),
                         hf_tokenizer.model_tokenizers({MODEL: model_dir}))


def _ask(context: str, question: str) -> router.Prompt:
    return router.Prompt.from_messages([{"role": "system", "content": context},
                                        {"role": "user", "content": question}], 32)


def test_the_prefix_index_hashes_real_token_ids_in_the_engines_block_size(
        model_dir: str, reference: tokenizers.Tokenizer) -> None:
    r = _router(model_dir)
    context = " ".join(f"Clause {i}: the tenant pays on day {i % 28 + 1}." for i in range(200))
    first = _ask(context, "Who pays?")
    decision = r.route(MODEL, first)
    assert decision is not None
    assert decision.prompt.tokenizer.startswith("model tokenizer")
    assert set(decision.prompt.hashes_by_block_size) == {128}
    r.ledger.finish(r.dispatched(decision, decision.candidates[0], first))
    second = _ask(context, "When is rent due?")
    again = r.route(MODEL, second)
    assert again is not None and again.candidates[0].backend == decision.candidates[0].backend
    ids_1, ids_2 = first.token_ids, second.token_ids
    assert ids_2 == tuple(reference.encode(
        hf_tokenizer.load(model_dir).render(second.messages or []),
        add_special_tokens=False).ids)
    common = next(i for i, (x, y) in enumerate(zip(ids_1, ids_2, strict=False)) if x != y)
    # Exactly the whole 128-token blocks the two prompts share: what vLLM reports.
    assert again.candidates[0].cached_tokens == common // 128 * 128 > 0
    assert again.candidates[0].tokenizer.startswith("model tokenizer")


def test_explain_says_which_tokenizer_each_model_used(model_dir: str) -> None:
    r = _router(model_dir)
    verdicts, _ = r.explain(MODEL, _ask("context " * 50, "q"))
    assert {v.tokenizer for v in verdicts} == {f"model tokenizer {model_dir}"}
    verdicts, _ = r.explain(OTHER, _ask("context " * 50, "q"))
    assert {v.tokenizer for v in verdicts} == {"approximate"}


def test_a_tokenizer_that_cannot_be_loaded_is_a_config_error(tmp_path: pathlib.Path) -> None:
    class Model:
        name, tokenizer = "m", str(tmp_path / "nothing-here")

    with pytest.raises(ValueError, match=r"models\[0\]\.tokenizer: no tokenizer.json"):
        hf_tokenizer.from_settings([Model()], lambda n: n)


def test_templates_that_loop_over_content_parts_get_parts() -> None:
    openai = ("{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}"
              "{% endfor %}{% endfor %}")
    assert hf_tokenizer.content_format(openai) == "openai"
    assert hf_tokenizer.content_format("{% for m in messages %}{{ m['content'] }}"
                                       "{% endfor %}") == "string"


def test_past_32_tenants_the_memos_of_pieces_shrink_so_their_total_stays_bounded() -> None:
    """Each tenant keeps at least one partition's memo (its share never falls to none), so
    with a thousand tenants a full memo each held thirty times the pieces of 32 memos."""
    total = tokenization.PARTITIONS_KEPT * tokenization.PIECES_PER_PARTITION
    try:
        for tenants in (2, 32, 1000):
            tokenization.keep_memos(tenants)
            memo = tokenization._pieces_of(1, "tenant a")
            assert memo.kept * max(tenants, tokenization.PARTITIONS_KEPT) <= total
            assert memo.kept == min(tokenization.PIECES_PER_PARTITION, total // tenants)
    finally:
        tokenization.keep_memos(1)


def _held(tenant: str, partition: int) -> list[str]:
    """The long rendered messages ``tenant`` holds in the memo under ``partition``."""
    prefix = f"{partition}:"
    return [key[len(prefix):] for _, key, _ in tokenization._long_messages.items(tenant)
            if key.startswith(prefix)]


def _short_memo(tenant: str) -> Any:
    """``tenant``'s memo of short messages (a functools.lru_cache: its cache_info)."""
    return tokenization._short_memo(tenant)


def test_the_approximations_memo_is_kept_per_partition() -> None:
    """A message one tenant sent never comes from the memo for another (whose timing
    would tell it that message was sent); within a tenant's partition it does. Short
    messages and long ones alike."""
    said = [{"role": "system", "content": "a system prompt only tenant b uses " * 20},
            {"role": "user", "content": "and its question"}]
    system = tok.render_chat(said[:1], add_generation_prompt=False)
    assert len(system) > tokenization.SHORT_MESSAGE     # a long one, and a short one

    def prompt(tenant: str, salt: str = "test_tokenization") -> router.Prompt:
        made = router.Prompt.from_messages(said)
        made.partition(f"the salt of {tenant}, {salt}", tenant)
        return made
    tokenization.keep_memos(2)
    try:
        theirs = prompt("tenant b")
        theirs.tokenize()
        assert system in _held("tenant b", theirs.hash_seed)
        mine = prompt("tenant a")
        assert not _held("tenant a", mine.hash_seed)
        assert mine.token_ids == theirs.token_ids       # the same count, counted again
        assert system in _held("tenant a", mine.hash_seed)
        calls = _short_memo("tenant a").cache_info()
        assert (calls.hits, calls.misses) == (0, 2)     # its question, the generation prompt
        prompt("tenant a").tokenize()                   # its own partition: from its memo
        assert _short_memo("tenant a").cache_info().hits == 2
        prompt("tenant a", "another salt").tokenize()   # its other partition: not
        assert _short_memo("tenant a").cache_info().misses == 4
    finally:
        tokenization.keep_memos(1)


def test_a_tenants_many_messages_never_drop_another_tenants_memo_of_messages() -> None:
    """With one order for all, a tenant's request of MESSAGES_KEPT messages dropped every
    other tenant's memoised messages (their next turn tokenized anew), and its own oldest
    message, timed after a pause, said whether anyone else had sent one meanwhile. Each
    tenant holds its share, and drops only its own."""
    tokenization.keep_memos(2)
    try:
        def b_turn() -> None:
            b = router.Prompt.from_messages([{"role": "user", "content": "tenant b's turn"}])
            b.partition("b's salt", "tenant b")
            b.tokenize()
        b_turn()
        a = router.Prompt.from_messages([{"role": "user", "content": f"a's message {i}"}
                                         for i in range(tokenization.MESSAGES_KEPT)])
        a.partition("a's salt", "tenant a")
        a.tokenize()
        b_turn()
        assert _short_memo("tenant b").cache_info().hits == 2, "a's messages dropped b's"
        assert _short_memo("tenant a").cache_info().currsize == tokenization.MESSAGES_KEPT // 2
    finally:
        tokenization.keep_memos(1)


def test_a_tenants_long_messages_are_memoised_up_to_its_share_of_the_bytes() -> None:
    """The memo of messages was bounded by its count of messages alone: MESSAGES_KEPT
    messages of a megabyte held gigabytes (each rendered message and its ids). A tenant's
    messages hold at most its share of MESSAGE_BYTES_KEPT, its oldest dropped past it."""
    tenants = 32
    tokenization.keep_memos(tenants)
    try:
        share = tokenization.MESSAGE_BYTES_KEPT // tenants
        long = [f"tenant a's message {i}: " + "word " * 20_000 for i in range(10)]
        for text in long:                       # fewer messages than its share of them
            prompt = router.Prompt.from_messages([{"role": "user", "content": text}])
            prompt.partition("a's salt", "tenant a")
            prompt.tokenize()
        held = [(key, memoised.ids) for _, key, memoised in tokenization._long_messages.items()]
        assert sum(sys.getsizeof(k) + sys.getsizeof(ids) for k, ids in held) <= share
        latest = tok.render_chat([{"role": "user", "content": long[-1]}],
                                 add_generation_prompt=False)
        assert latest in _held("tenant a", prompt.hash_seed)    # a long message is kept
    finally:
        tokenization.keep_memos(1)


def test_the_approximations_pieces_come_from_a_memo_of_the_partitions_own() -> None:
    """Below the memo of messages, the ids of pieces: one tenant's pieces are never in
    another's memo (a hit's speed told it which pieces another had sent), the ids are the
    same, and only the latest PARTITIONS_KEPT partitions keep a memo."""
    tokenization.keep_memos(1)     # one tenant: its share is the whole
    said = [{"role": "user", "content": "zqxw vbnm plkj rare pieces of tenant b"}]

    def ids(salt: str) -> tuple[int, ...]:
        made = router.Prompt.from_messages(said)
        made.partition(salt)
        return made.token_ids
    b_ids = ids("the salt of tenant b, pieces test")
    b_seed = router.Prompt.from_messages(said)
    b_seed.partition("the salt of tenant b, pieces test")
    assert "zqxw" in tokenization._pieces_of(b_seed.hash_seed)
    a_seed = router.Prompt.from_messages(said)
    a_seed.partition("the salt of tenant a, pieces test")
    assert "zqxw" not in tokenization._pieces_of(a_seed.hash_seed)
    assert ids("the salt of tenant a, pieces test") == b_ids
    for i in range(tokenization.PARTITIONS_KEPT + 5):
        tokenization._pieces_of(10**6 + i)
    assert len(tokenization._pieces) == tokenization.PARTITIONS_KEPT


def test_a_tenants_many_cache_salts_never_drop_another_tenants_memo_of_pieces() -> None:
    """A tenant makes a partition per ``cache_salt`` it sends. With one order for all,
    its requests under 32 salts dropped every other tenant's memo of pieces (their
    texts tokenized slower), and its own oldest memo, timed after a pause, said whether
    anyone else had sent a request meanwhile. Each tenant holds its share, and a new
    partition drops only its own tenant's least recently used one."""
    tokenization.keep_memos(2)
    try:
        def prompt(tenant: str, salt: str) -> router.Prompt:
            made = router.Prompt.from_text(f"zqxw {tenant}'s rare pieces, {salt}")
            made.partition(f"{tenant}/{salt}", tenant)
            made.tokenize()
            return made
        def kept(made: router.Prompt) -> bool:   # looked at without making one
            memo = tokenization._pieces.peek(made.tenant, str(made.hash_seed))
            return memo is not None and "zqxw" in memo
        b = prompt("tenant b", "its only salt")
        share = tokenization.PARTITIONS_KEPT // 2
        a = [prompt("tenant a", f"salt {i}") for i in range(tokenization.PARTITIONS_KEPT)]
        assert kept(b), "a's partitions dropped b's memo"
        # a's oldest are its own to drop: it keeps its share, its latest
        assert [kept(p) for p in a] == [False] * share + [True] * share
        prompt("tenant b", "another salt")
        assert kept(a[-share]), "b's new partition dropped a's oldest"
    finally:
        tokenization.keep_memos(1)


class _Words:
    """A tokenizers model with a cache of words, as BPE and Unigram have."""

    def __init__(self) -> None:
        self.cache_size: int | None = None

    def _resize_cache(self, size: int) -> None:
        self.cache_size = size


class _Tokenizer:
    """The parts of a ``tokenizers.Tokenizer`` that a model tokenizer uses at load."""

    def __init__(self) -> None:
        self.model = _Words()
        self.encoded: list[str] = []

    def get_added_tokens_decoder(self) -> dict[int, Any]:
        return {}

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        self.encoded.append(text)
        return types_mod.SimpleNamespace(ids=[7] * len(text))


def test_a_model_tokenizers_own_cache_of_words_is_turned_off() -> None:
    """Below the memo of pieces (per partition), a BPE's cache of words serves every
    partition: a 45 KB message another tenant had sent encoded faster than a wrong guess
    (its speed said it was sent). Off, every partition's miss encodes each word anew."""
    fake = _Tokenizer()
    hf = hf_tokenizer.HFTokenizer(fake, None, {}, "fake")
    assert fake.model.cache_size == 0
    assert hf.encode_prompt("abc") == (7, 7, 7)


def test_a_tenants_prompts_never_drop_another_tenants_pieces_from_a_model_tokenizers_memo(
        ) -> None:
    """With one order for all, a tenant's long prompts (MEMO_MAX_TOKENS ids of them)
    dropped every other tenant's memoised pieces (their next turns encoded anew), and its
    own oldest piece, timed after a pause, said whether anyone else had sent a prompt
    meanwhile. Each tenant holds its share of the ids, and drops only its own."""
    fake = _Tokenizer()         # a character an id: a text of n characters is n ids
    model = hf_tokenizer.ModelTokenizer(hf_tokenizer.HFTokenizer(fake, None, {}, "fake"))
    tokenizers = tokenization.Tokenizers({MODEL: model})
    tokenizers.keep_memos(2)    # as the app factory does, for two tenants
    try:
        ids = 10_000
        theirs = "tenant b's prompt"
        model.text_ids(theirs, 2, "tenant b")
        mine = [f"{i:05d}".ljust(ids, "a") for i in range(hf_tokenizer.MEMO_MAX_TOKENS // ids + 1)]
        for text in mine:
            model.text_ids(text, 1, "tenant a")
        fake.encoded.clear()
        model.text_ids(theirs, 2, "tenant b")
        assert not fake.encoded, "a's prompts dropped b's pieces"
        kept = hf_tokenizer.MEMO_MAX_TOKENS // 2 // ids     # a's share: its latest
        for text in mine[-kept:]:
            model.text_ids(text, 1, "tenant a")
        assert not fake.encoded
        model.text_ids(mine[-kept - 1], 1, "tenant a")
        assert fake.encoded == [mine[-kept - 1]], "a kept more than its share"
    finally:
        tokenizers.keep_memos(1)
