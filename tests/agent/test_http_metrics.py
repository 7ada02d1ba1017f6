"""The agent's metrics port: ``/metrics`` behind ``metrics.bearer_token_file``.

Its gauges name the models and their running and waiting requests, so a model only one
tenant may use shows that tenant's traffic: with the token file set, a scrape without the
token, or with another, gets a 401 that names neither; ``/healthz`` stays open for probes.
Served over real HTTP, in process and by the real ``synapse agent``.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from agent import http_metrics
from tests import harness
from tests.agent.conftest import agent_config

TOKEN = "agent-metrics-token-5d1c9e7a3b"
# a model name only one tenant may use: what the token keeps from the others
SECRET_MODEL = "acme-private-finetune"
WRONG = [None, "not-the-token", TOKEN + "x", TOKEN[:-1], "Basic " + TOKEN, TOKEN.upper()]


def _header(value: str | None) -> dict[str, str]:
    if value is None:
        return {}
    return {"Authorization": value if value.startswith("Basic ") else f"Bearer {value}"}


def assert_refused(status: int, body: bytes, sent: str | None) -> None:
    assert status == 401, (sent, status, body[:200])
    assert SECRET_MODEL.encode() not in body and b"synapse_agent" not in body
    assert TOKEN.encode() not in body
    assert sent is None or sent.encode() not in body
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_metrics_token"
    assert "metrics.bearer_token_file" in error["message"]


@pytest.fixture
async def server(tmp_path: pathlib.Path):
    registry = CollectorRegistry()
    running = Gauge("synapse_agent_backend_running", "running requests", ["model"],
                    registry=registry)
    token_file = tmp_path / "metrics-token"
    token_file.write_text(f"  {TOKEN}\n")  # as a mounted Secret may hold it
    srv = http_metrics.MetricsServer(
        registry, lambda: running.labels(SECRET_MODEL).set(3), "127.0.0.1", 0,
        token_sha256=http_metrics.read_token(str(token_file)))
    await srv.start()
    yield f"http://127.0.0.1:{srv.port}"
    await srv.stop()


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize("sent", WRONG, ids=repr)
async def test_metrics_refuse_a_scrape_without_the_token(server: str, sent: str | None) -> None:
    status, body = await _get(f"{server}/metrics", _header(sent))
    assert_refused(status, body, sent)


async def test_metrics_answer_the_token_and_health_needs_none(server: str) -> None:
    status, body = await _get(f"{server}/metrics", _header(TOKEN))
    assert status == 200
    assert f'synapse_agent_backend_running{{model="{SECRET_MODEL}"}} 3.0'.encode() in body
    # probes carry no token
    status, body = await _get(f"{server}/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}


async def test_without_a_token_file_metrics_stay_open() -> None:
    registry = CollectorRegistry()
    Gauge("synapse_agent_up", "up", registry=registry).set(1)
    srv = http_metrics.MetricsServer(registry, lambda: None, "127.0.0.1", 0)
    await srv.start()
    try:
        status, body = await _get(f"http://127.0.0.1:{srv.port}/metrics")
    finally:
        await srv.stop()
    assert status == 200 and b"synapse_agent_up 1.0" in body


def test_an_unreadable_or_empty_token_file_is_a_config_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(http_metrics.TokenFileError,
                       match=r"^metrics\.bearer_token_file: cannot read .*/absent"):
        http_metrics.read_token(str(tmp_path / "absent"))
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(http_metrics.TokenFileError,
                       match=r"^metrics\.bearer_token_file: .*/empty is empty"):
        http_metrics.read_token(str(tmp_path / "empty"))
    assert http_metrics.read_token(None) is None


# -- the real process ------------------------------------------------------------------


def test_the_agent_process_serves_metrics_only_to_the_token(
        tmp_path: pathlib.Path, start_agent) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text(TOKEN + "\n")
    cfg = agent_config(tmp_path, None, metrics={"bearer_token_file": str(token_file)})
    agent = start_agent(cfg)
    for key in (None, "not-the-token", TOKEN + "x", TOKEN[:-1]):
        status, _, body = harness.http(agent.metrics_url, key=key)
        assert_refused(status, body, key)
    status, _, body = harness.http(agent.metrics_url, key=TOKEN)
    assert status == 200 and b'synapse_agent_telemetry_ok{node="test-node"' in body, body[:300]
    health = agent.metrics_url.removesuffix("/metrics") + "/healthz"
    assert harness.http(health)[0] == 200


@pytest.mark.parametrize("content", [None, ""], ids=["absent", "empty"])
def test_the_agent_does_not_start_without_its_token_file(
        tmp_path: pathlib.Path, content: str | None) -> None:
    token_file = tmp_path / "metrics-token"
    if content is not None:
        token_file.write_text(content)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(agent_config(
        tmp_path, None, metrics={"bearer_token_file": str(token_file)})))
    result = subprocess.run([harness.console_script("synapse"), "agent", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "config error: metrics.bearer_token_file" in result.stderr
    assert "agent metrics listening" not in result.stderr + result.stdout


async def _open_with(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def test_a_stalled_request_head_is_closed_and_connections_are_capped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone reaching the port kept 2,000 half-sent request heads open indefinitely
    (probe finding): a head now has HEAD_TIMEOUT_S, and past MAX_CONNECTIONS the
    connection waiting longest is closed for a new one; a scrape still gets through."""
    monkeypatch.setattr(http_metrics, "HEAD_TIMEOUT_S", 0.3)
    monkeypatch.setattr(http_metrics, "MAX_CONNECTIONS", 4)
    srv = http_metrics.MetricsServer(CollectorRegistry(), lambda: None, "127.0.0.1", 0)
    await srv.start()
    try:
        reader, writer = await _open_with(srv.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""      # closed, unanswered
        writer.close()
        # a silent connection too
        reader, writer = await _open_with(srv.port, b"")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # more half-sent heads than the cap: the oldest ones are closed for the new ones
        monkeypatch.setattr(http_metrics, "HEAD_TIMEOUT_S", 60.0)
        held = [await _open_with(srv.port, b"GET /metrics HTTP/1.1\r\n") for _ in range(6)]
        for reader, _ in held[:2]:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{srv.port}/healthz") as reply:
            assert reply.status == 200
        for _, writer in held:
            writer.close()
    finally:
        await srv.stop()
