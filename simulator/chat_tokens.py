"""Token ids of chat prompts, with a cache per rendered message.

Tokenizing is the largest per-request cost of the simulator (a blake2b digest per
token), and chat traffic repeats itself: the same system prompt and the same earlier
turns arrive again and again. So a chat prompt is tokenized message by message, each
message's rendering cached (LRU, bounded by the total tokens held) except the last
message's, which is usually the new question.

This relies on two properties of ``synapse_common.tokens``, both checked by
``tests/simulator/test_chat_tokens.py`` so a change of template or tokenizer cannot
silently break it:

* ``render_chat(messages)`` is the concatenation of ``render_chat([m], False)`` for each
  message, followed by ``render_chat([], True)`` (the generation prompt);
* ``tokenize`` splits at those boundaries: every rendered message ends with a newline
  after ``>`` and the next starts with ``<``, so no token spans two messages.

The template and the tokenizer themselves stay in ``synapse_common.tokens``; this module
only decides what to cache. A lock guards the cache: very large requests are prepared
in a worker thread while the event loop serves the others.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from synapse_common import tokens

DEFAULT_MAX_TOKENS_HELD = 200_000  # about 8 MB of cached ids at most


class ChatTokenizer:
    def __init__(self, max_tokens_held: int = DEFAULT_MAX_TOKENS_HELD) -> None:
        self.max_tokens_held = max_tokens_held
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._suffix = tokens.tokenize(tokens.render_chat([], add_generation_prompt=True))
        self.hits = 0
        self.misses = 0

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """``tokens.tokenize(tokens.render_chat(messages))``, faster on repeats."""
        ids: list[int] = []
        last = len(messages) - 1
        for i, message in enumerate(messages):
            chunk = tokens.render_chat([message], add_generation_prompt=False)
            # The last message is usually new (the question being asked): not worth keeping.
            ids.extend(self._chunk(chunk, keep=i < last))
        ids.extend(self._suffix)
        return ids

    def _chunk(self, chunk: str, keep: bool = True) -> list[int]:
        with self._lock:
            cached = self._cache.get(chunk)
            if cached is not None:
                self._cache.move_to_end(chunk)
                self.hits += 1
                return cached
            self.misses += 1
        ids = tokens.tokenize(chunk)  # outside the lock: the slow part
        if keep and len(ids) <= self.max_tokens_held:
            with self._lock:
                self._store(chunk, ids)
        return ids

    def _store(self, chunk: str, ids: list[int]) -> None:
        if chunk in self._cache:
            return  # another thread got there first
        self._cache[chunk] = ids
        self._held += len(ids)
        while self._held > self.max_tokens_held:
            _, evicted = self._cache.popitem(last=False)
            self._held -= len(evicted)
