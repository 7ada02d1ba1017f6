"""What a client can tell apart of a chat-completion stream, shared by the replay tests
and the hostile-tenant cache suite (a replayed stream must be indistinguishable)."""

from __future__ import annotations

from typing import Any


def shape(chunks: list[dict[str, Any]]) -> list[Any]:
    """What a client can tell apart of a stream, runs of like chunks collapsed: the keys of
    each chunk, of its choices and deltas, and which values are set. A top-level key whose
    value is null tells a client nothing (vLLM's first chunk may carry
    ``prompt_token_ids: null``; a replay need not), so it is left out."""
    out: list[Any] = []
    for chunk in chunks:
        sig = (sorted(k for k, v in chunk.items() if k != "choices" and v is not None),
               [(sorted(c), sorted(c.get("delta") or {}), c.get("finish_reason") is not None,
                 c.get("logprobs") is not None) for c in chunk.get("choices") or ()])
        if not out or out[-1] != sig:
            out.append(sig)
    return out
