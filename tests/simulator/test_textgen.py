"""Deterministic pseudo-text: same prompt and seed give the same words; limits apply."""

from __future__ import annotations

from simulator import textgen
from synapse_common import tokens


def test_same_prompt_and_seed_give_the_same_text_and_others_differ() -> None:
    a = textgen.generate("Tell me about caches.", seed=1, index=0, max_tokens=64)
    assert a == textgen.generate("Tell me about caches.", seed=1, index=0, max_tokens=64)
    assert a.text != textgen.generate("Tell me about caches.", seed=2, index=0,
                                      max_tokens=64).text
    assert a.text != textgen.generate("Tell me about caches.", seed=1, index=1,
                                      max_tokens=64).text
    assert a.text != textgen.generate("Tell me about queues.", seed=1, index=0,
                                      max_tokens=64).text


def test_text_is_readable_words_and_counts_as_many_tokens_as_reported() -> None:
    out = textgen.generate("hello", seed=0, index=0, max_tokens=200, ignore_eos=True)
    assert out.num_tokens == 200 and out.finish_reason == "length"
    assert out.text[0].isupper()
    words = out.text.replace(".", " ").split()
    assert all(w.lower() in textgen.WORDS for w in words)
    assert tokens.count_tokens(out.text) == out.num_tokens


def test_max_tokens_cuts_with_length_and_the_natural_end_is_stop() -> None:
    short = textgen.generate("p", seed=3, index=0, max_tokens=5)
    assert short.num_tokens == 5 and short.finish_reason == "length"
    natural = textgen.generate("p", seed=3, index=0, max_tokens=10_000)
    assert natural.finish_reason == "stop" and natural.stop_reason is None
    assert textgen.MIN_NATURAL <= natural.num_tokens <= textgen.MAX_NATURAL
    assert natural.text.startswith(short.text)


def test_a_stop_string_ends_the_text_before_it() -> None:
    full = textgen.generate("q", seed=0, index=0, max_tokens=100, ignore_eos=True)
    stop_word = full.pieces[10]  # e.g. " tree"
    cut = textgen.generate("q", seed=0, index=0, max_tokens=100, ignore_eos=True,
                           stop=[stop_word, "never-appears"])
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_word
    assert stop_word not in cut.text
    assert full.text.startswith(cut.text)
    assert cut.num_tokens <= 11
