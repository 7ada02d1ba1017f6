"""The per-message token cache gives exactly the shared tokenizer's ids for the prompt."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import chat_tokens
from synapse_common import tokens

TEXT = st.text(st.sampled_from("ab Z9.,!<>|\n\t  é"), max_size=40)
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool"]),
    "content": st.one_of(TEXT, st.none(),
                         st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                         "text": TEXT}), max_size=3)),
})


@given(st.lists(MESSAGE, min_size=1, max_size=5))
@settings(max_examples=300, deadline=None)
def test_same_ids_as_tokenizing_the_rendered_prompt(messages: list[dict]) -> None:
    tokenizer = chat_tokens.ChatTokenizer()
    expected = tokens.tokenize(tokens.render_chat(messages))
    assert tokenizer.chat(messages) == expected
    assert tokenizer.chat(messages) == expected  # and again, from the cache


def test_repeated_messages_hit_the_cache_and_the_budget_holds() -> None:
    tokenizer = chat_tokens.ChatTokenizer(max_tokens_held=100)
    system = {"role": "system", "content": "You are terse. " * 5}
    for i in range(20):
        tokenizer.chat([system, {"role": "user", "content": f"question {i}"}])
    assert tokenizer.hits >= 19
    assert tokenizer._held <= 100
    assert len(tokenizer._cache) == 1  # the system prompt; the questions are not kept
