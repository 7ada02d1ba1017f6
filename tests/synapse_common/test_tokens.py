"""The shared tokenizer and block hashes are deterministic and prefix-stable."""

from __future__ import annotations

from synapse_common import tokens


def test_roughly_four_characters_per_token() -> None:
    text = "The quick brown fox jumps over the lazy dog near the riverbank. " * 20
    n = tokens.count_tokens(text)
    assert len(text) / 6 < n < len(text) / 3


def test_same_text_same_ids_and_different_text_differs() -> None:
    assert tokens.tokenize("hello world") == tokens.tokenize("hello world")
    assert tokens.tokenize("hello world") != tokens.tokenize("hello there")


def test_shared_prefix_shares_block_hashes_then_diverges() -> None:
    shared = "You are a careful assistant. " * 40
    a = tokens.tokenize(tokens.render_chat([{"role": "system", "content": shared},
                                            {"role": "user", "content": "What is 2+2?"}]))
    b = tokens.tokenize(tokens.render_chat([{"role": "system", "content": shared},
                                            {"role": "user", "content": "Name a colour."}]))
    ha, hb = tokens.block_hashes(a, 16), tokens.block_hashes(b, 16)
    common = 0
    while common < min(len(ha), len(hb)) and ha[common] == hb[common]:
        common += 1
    assert common >= 10
    assert ha[common:] != hb[common:]


def test_only_full_blocks_are_hashed() -> None:
    assert tokens.block_hashes(list(range(40)), 16) == tokens.block_hashes(list(range(32)), 16)
    assert len(tokens.block_hashes(list(range(15)), 16)) == 0


def test_token_ids_are_pinned() -> None:
    """Ids are part of the contract between simulator prefix caches and the router's
    prefix index (and of anything they persisted): a change to the rules must be seen."""
    text = "Hi  there,\t\t\t\t\t\t\t\tworld 12345!\n" + " " * 17 + "naïve 中文"
    assert tokens.tokenize(text) == [
        1018698255, 580191784, 459286685, 792503551, 579531077, 202129205, 1005264863,
        972798565, 999093963, 1584705408, 579531077, 579531077, 1399536239, 1943869409,
        96855703, 1388825851, 294209082]
    assert tokens.tokenize("") == [] and tokens.tokenize(" " * 7) == []
