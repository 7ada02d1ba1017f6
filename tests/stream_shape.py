"""What a client can tell apart of a chat-completion stream, shared by the replay tests
and the hostile-tenant cache suite (a replayed stream must be indistinguishable)."""

from __future__ import annotations

from typing import Any

# A choice's keys that every chunk of an OpenAI stream carries, null or not.
CHOICE_KEYS = frozenset({"index", "delta", "finish_reason", "logprobs"})


def _set(mapping: dict[str, Any], always: frozenset[str] = frozenset()) -> list[str]:
    """Its keys, but a key whose value is null only when it is one of ``always``."""
    return sorted(k for k, v in mapping.items() if v is not None or k in always)


def shape(chunks: list[dict[str, Any]]) -> list[Any]:
    """What a client can tell apart of a stream, runs of like chunks collapsed: the keys of
    each chunk, of its choices and deltas, and which values are set. A key whose value is
    null tells a client nothing beyond the standard ones (``CHOICE_KEYS``): vLLM sends
    ``prompt_token_ids: null`` in a first chunk or ``token_ids: null`` in a choice in
    some streams and not in others, and a replay need not, so those are left out."""
    out: list[Any] = []
    for chunk in chunks:
        sig = (_set({k: v for k, v in chunk.items() if k != "choices"}),
               [(_set(c, CHOICE_KEYS), sorted(c.get("delta") or {}),
                 c.get("finish_reason") is not None, c.get("logprobs") is not None)
                for c in chunk.get("choices") or ()])
        if not out or out[-1] != sig:
            out.append(sig)
    return out
