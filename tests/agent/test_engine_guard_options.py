"""``OPTIONS`` through the guard a keyed vLLM loads: only a CORS preflight passes without
the key. vLLM mounts Prometheus' ASGI app on ``/metrics``, and that app answers every
method, so a bare ``OPTIONS /metrics`` that the guard let through returned the engine's
metrics (its models, their requests) to any pod reaching the port."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.agent.test_engine_guard import KEY, load_guard

PREFLIGHT = [(b"origin", b"http://example.com"), (b"access-control-request-method", b"POST")]


def metrics_mount(reached: list[str]) -> Any:
    """An engine whose /metrics answers any method, as Prometheus' ASGI app in vLLM."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'vllm:num_requests_running{'
                    b'model_name="tenant-only-model"} 3.0\n'})
    return app


def ask(guard: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]
        ) -> tuple[int, bytes, list[str]]:
    reached: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "headers": headers}
    asyncio.run(guard(metrics_mount(reached))(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, reached


@pytest.mark.parametrize("headers", [[], [PREFLIGHT[0]], [PREFLIGHT[1]],
                                     [(b"authorization", b"Bearer wrong")]],
                         ids=["bare", "origin-only", "method-only", "wrong-key"])
def test_an_options_that_is_no_preflight_wants_the_key(
        monkeypatch: pytest.MonkeyPatch, headers: list[tuple[bytes, bytes]]) -> None:
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    guard = load_guard()
    for path in ("/metrics", "/metrics/", "/v1/chat/completions", "/invocations"):
        status, body, reached = ask(guard, "OPTIONS", path, headers)
        assert (status, reached) == (401, []), path
        assert b"tenant-only-model" not in body


def test_a_preflight_or_the_key_still_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    guard = load_guard()
    assert ask(guard, "OPTIONS", "/v1/chat/completions", PREFLIGHT)[2] == ["OPTIONS"]
    keyed = [(b"authorization", b"Bearer " + KEY.encode())]
    assert ask(guard, "OPTIONS", "/metrics", keyed)[0] == 200
    monkeypatch.delenv("VLLM_API_KEY")
    assert ask(load_guard(), "OPTIONS", "/metrics", [])[0] == 200     # no key: no guard
