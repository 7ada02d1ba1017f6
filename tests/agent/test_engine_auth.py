"""The embedder presents the engine key only to a TEI the agent itself starts."""

from __future__ import annotations

from typing import Any

from agent import engine_auth
from agent.config import AgentSettings

TOKEN = "engine-auth-test-token-1f3a"
KEY = "this-nodes-own-engine-key-4e2b"
TEI = {"name": "embed", "engine": "tei", "model": "m", "port": 8001, "task": "embed"}


def _cfg(tei_url: str, backends: list[dict[str, Any]], token: str | None = TOKEN,
         **supervisor: Any) -> AgentSettings:
    return AgentSettings.model_validate({
        "control_plane": {"token": token} if token else {}, "backends": backends,
        "supervisor": supervisor, "embedder": {"kind": "tei", "tei_url": tei_url}})


def test_the_agents_own_tei_gets_the_key() -> None:
    want = {"Authorization": f"Bearer {KEY}"}
    assert engine_auth.embedder_headers(_cfg("http://127.0.0.1:8001", [TEI]), KEY) == want
    assert engine_auth.embedder_headers(_cfg("http://localhost:8001/", [TEI]), KEY) == want
    assert engine_auth.embedder_headers(
        _cfg("http://10.1.2.3:8001", [TEI], engine_host="10.1.2.3"), KEY) == want


def test_a_tei_elsewhere_or_without_a_token_gets_nothing() -> None:
    assert engine_auth.embedder_headers(_cfg("http://tei.example:8001", [TEI]), KEY) == {}
    assert engine_auth.embedder_headers(_cfg("http://127.0.0.1:9999", [TEI]), KEY) == {}
    external = {**TEI, "engine": "external", "url": "http://127.0.0.1:8001"}
    assert engine_auth.embedder_headers(_cfg("http://127.0.0.1:8001", [external]), KEY) == {}
    assert engine_auth.embedder_headers(_cfg("http://127.0.0.1:8001", [TEI], token=None),
                                        None) == {}
