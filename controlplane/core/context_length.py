"""The fewest tokens a prompt can be to any real tokenizer (pure): what lets Synapse refuse a
prompt that certainly cannot fit a model's context before an engine spends its time
tokenizing it.

An engine refuses a prompt longer than its context (``max_model_len``) with a 400, but
only after tokenizing the whole prompt, on the thread every tenant's requests share; the
refusal carries no usage, so the sender is barely charged for it. The router's own token
count is a stand-in (the approximation of ``synapse_common.tokens``, or a configured
tokenizer that may not be the engine's), so it cannot decide a refusal. This bound can:

* **Text.** A token of a byte-level BPE or SentencePiece vocabulary stands for at most
  as many characters as it has bytes, and no vocabulary in use has a token of more than
  a few dozen bytes, up to a hundred and some for runs of spaces or rule characters in
  code-trained ones. :data:`MAX_CHARS_PER_TOKEN` is set well above that, and the text is
  counted in characters (``len``: no encoding, and never more than its UTF-8 bytes), so
  ``ceil(characters / MAX_CHARS_PER_TOKEN)`` tokens is a floor for any of them.
* **Which text.** Only what every chat template renders as sent: the content of ``user``
  messages (strings, and ``text`` parts). Templates drop other things: the reasoning of
  earlier assistant turns (Qwen3, DeepSeek-R1), roles they have no branch for (system,
  tool, developer in minimal templates). A completions prompt is sent whole; token ids
  are counted exactly (the engine takes them as they are); of a batch, each prompt is a
  sequence of its own, so the longest counts.
* **Truncation.** A request that asks the engine to cut its prompt (vLLM's
  ``truncate_prompt_tokens``, Responses' ``truncation: "auto"``) is never refused by it:
  its floor is 0.

:class:`Prompt.least_tokens <controlplane.core.tokenization.Prompt>` carries the floor to
the router, which leaves out a backend whose reported context it exceeds, and to
:meth:`controlplane.core.dispatch.Dispatcher.plan`, which refuses the request with
``context_length_exceeded`` when every routable backend of every model it may go to
reports its context and none holds it (a backend whose context is unknown may take it,
as before).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Characters one token stands for at most, in any vocabulary Synapse may front: well above
# the longest tokens known (runs of spaces in code-trained byte-level BPE vocabularies).
MAX_CHARS_PER_TOKEN = 256
# Fields by which a request asks the engine to shorten its prompt to fit.
TRUNCATING = ("truncate_prompt_tokens",)


def _floor(chars: int) -> int:
    return -(-chars // MAX_CHARS_PER_TOKEN)


def truncates(body: Mapping[str, Any]) -> bool:
    """Whether ``body`` lets the engine cut its prompt (then no floor holds)."""
    for name in TRUNCATING:
        if body.get(name) is not None:
            return True
    return body.get("truncation") == "auto"


def of_messages(messages: Sequence[Any]) -> int:
    """The floor of a chat's tokens: its ``user`` messages' text (module docstring)."""
    chars = 0
    for m in messages:
        if type(m) is not dict or m.get("role") != "user":
            continue
        content = m.get("content")
        if type(content) is str:
            chars += len(content)
        elif type(content) is list:
            for part in content:
                if type(part) is dict and part.get("type") == "text":
                    text = part.get("text")
                    if type(text) is str:
                        chars += len(text)
    return _floor(chars)


def of_prompt(prompt: Any) -> int:
    """The floor of a completions ``prompt``'s longest sequence: a string's, the longest
    string of an array's, a token-id array's length, the longest of an array of them."""
    if type(prompt) is str:
        return _floor(len(prompt))
    if type(prompt) is not list or not prompt:
        return 0
    first = type(prompt[0])
    if first is str:
        return _floor(max(len(p) for p in prompt if type(p) is str))
    if first is list:
        return max(len(p) for p in prompt if type(p) is list)
    return len(prompt)


def of_chat_body(body: Mapping[str, Any], messages: Sequence[Any]) -> int:
    """The floor of a chat-shaped request (chat, Responses as messages, Anthropic's
    translation) whose body is ``body``: 0 when it lets the engine truncate."""
    return 0 if truncates(body) else of_messages(messages)


def of_completion_body(body: Mapping[str, Any]) -> int:
    """The floor of a completions body's longest prompt: 0 when it lets the engine
    truncate."""
    return 0 if truncates(body) else of_prompt(body.get("prompt"))
