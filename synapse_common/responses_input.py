"""How a Responses API request (``/v1/responses``) reads as chat turns.

The control plane reads it to route, count tokens and key the cache; the simulator reads
it to answer as vLLM does. Both take ``instructions`` as a leading system turn, map the
Responses roles to chat roles the same way and turn a function call and its output into
the assistant and tool turns; those rules live here. What each refuses differs on
purpose and stays with it: the simulator refuses what vLLM refuses, with vLLM's messages,
while the control plane passes on what a backend may still accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
"""A Responses message's role -> the chat role it plays (``developer`` is a system turn)."""


def instructions(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The system turn ``instructions`` makes (none when it is absent or empty)."""
    value = body.get("instructions")
    if isinstance(value, str) and value:
        return [{"role": "system", "content": value}]
    return []


def function_turn(item: Mapping[str, Any]) -> dict[str, Any] | None:
    """The turn a ``function_call`` (the assistant's) or ``function_call_output`` (the
    tool's) item stands for; ``None`` for any other item."""
    kind = item.get("type", "message")
    if kind == "function_call":
        return {"role": "assistant", "content": str(item.get("arguments", ""))}
    if kind == "function_call_output":
        return {"role": "tool", "content": str(item.get("output", ""))}
    return None
