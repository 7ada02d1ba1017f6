"""The guard middleware a keyed vLLM loads (``agent/engine_guard/synapse_engine_guard.py``),
driven as the ASGI app it is, loaded from its directory as the engine loads it."""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
from typing import Any

import pytest

from agent.core import commands

KEY = "engine-key-0123456789abcdef"


def load_guard() -> Any:
    path = pathlib.Path(commands.GUARD_DIR) / "synapse_engine_guard.py"
    spec = importlib.util.spec_from_file_location("synapse_engine_guard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Guard


def call(guard: Any, method: str, path: str, auth: bytes | None = None,
         kind: str = "http") -> tuple[int, bytes, bool]:
    """(status, body, whether the engine's app was reached)."""
    reached: list[bool] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"engine"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"authorization", auth)] if auth is not None else []
    scope = {"type": kind, "method": method, "path": path, "root_path": "", "headers": headers}
    asyncio.run(guard(app)(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), 0)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, bool(reached)


@pytest.mark.parametrize("path", ["/invocations", "/v1/chat/completions", "/tokenize",
                                  "/pooling", "/metrics", "/score", "/load", "/anything"])
def test_every_path_wants_the_key(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    guard = load_guard()
    for auth in (None, b"Bearer wrong", b"Bearer " + KEY.encode() + b"x", KEY.encode(),
                 b"Basic " + KEY.encode(), b"Bearer " + KEY[:-1].encode()):
        status, body, reached = call(guard, "POST", path, auth)
        assert (status, reached) == (401, False), (path, auth)
        assert KEY.encode() not in body
    assert call(guard, "POST", path, b"Bearer " + KEY.encode()) == (200, b"engine", True)
    assert call(guard, "POST", path, b"bearer " + KEY.encode())[2]   # scheme in any case


def test_health_and_preflights_stay_open_and_no_key_means_no_guard(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    guard = load_guard()
    assert call(guard, "GET", "/health")[2] and call(guard, "HEAD", "/health")[2]
    assert not call(guard, "OPTIONS", "/v1/chat/completions")[2]    # bare: test_engine_guard_options
    assert not call(guard, "POST", "/health")[2]
    assert not call(guard, "GET", "/health/../invocations")[2]
    # A websocket without the key is closed before the engine sees it.
    assert not call(guard, "GET", "/v1/realtime", kind="websocket")[2]
    monkeypatch.delenv("VLLM_API_KEY")
    assert call(load_guard(), "POST", "/invocations")[2]
