"""controlplane.adapters.token_review against a fake Kubernetes API server (a real aiohttp
server on 127.0.0.1) answering TokenReviews from a table, and the agent_review settings.

The fake answers as the real API server does for bound tokens: the audiences it returns
are those of the request the token was issued for (none in common: not authenticated),
or, for an audience-unaware authenticator, none at all.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import pathlib
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import pydantic
import pytest
from aiohttp import web

from controlplane import config
from controlplane.adapters import token_review
from controlplane.settings import tenants

AGENT_SA = "system:serviceaccount:synapse:synapse-agent"
OTHER_SA = "system:serviceaccount:synapse:synapse-controlplane"


def jwt(mark: str, audience: str = "synapse-agent", exp: float = 4102444800.0) -> str:
    """A token shaped as a projected service-account token (a JWT for ``audience``,
    expiring at ``exp``), whose signature part is ``mark``: only the fake API server
    says whether it is genuine, as only the real one can."""
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part({'aud': [audience], 'exp': exp})}.{mark}"


GOOD = jwt("agent-token-on-gpu-node-1")
SECRET_MARK = "agent-token-on"            # part of every agent token in this file
OWN = "control-plane-own-token-1"


@dataclasses.dataclass(frozen=True)
class Bound:
    username: str
    node: str | None
    audiences: tuple[str, ...] = ("synapse-agent",)
    audience_aware: bool = True
    authenticated: bool = True


@dataclasses.dataclass
class FakeApiServer:
    url: str = ""
    tokens: dict[str, Bound] = dataclasses.field(default_factory=dict)
    seen: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    answer: str = "review"          # review | 500 | 401 | 403 | garbage | no-status | slow
    gate: asyncio.Event | None = None
    arrivals: asyncio.Queue[None] = dataclasses.field(default_factory=asyncio.Queue)
    released: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append((request.headers.get("Authorization", ""), body))
        self.arrivals.put_nowait(None)
        if self.gate is not None:
            await self.gate.wait()
        if self.answer == "slow":
            await self.released.wait()      # until the test ends
        if self.answer in ("500", "401", "403"):
            return web.Response(status=int(self.answer), text="{}")
        if self.answer == "garbage":
            return web.Response(status=201, text="<html>not json</html>")
        if self.answer == "no-status":
            return web.json_response({"kind": "TokenReview"}, status=201)
        return web.json_response({"apiVersion": "authentication.k8s.io/v1",
                                  "kind": "TokenReview", "status": self.status(body["spec"])},
                                 status=201)

    def status(self, spec: dict[str, Any]) -> dict[str, Any]:
        bound = self.tokens.get(spec["token"])
        if bound is None:
            return {"authenticated": False, "error": "[invalid bearer token]"}
        audiences = [a for a in spec["audiences"] if a in bound.audiences]
        if bound.audience_aware and not audiences:
            return {"authenticated": False, "error": "token audiences is invalid"}
        extra = {"authentication.kubernetes.io/pod-name": ["synapse-agent-x1"]}
        if bound.node is not None:
            extra["authentication.kubernetes.io/node-name"] = [bound.node]
        status: dict[str, Any] = {"authenticated": bound.authenticated, "user": {
            "username": bound.username, "uid": "u-1", "extra": extra,
            "groups": ["system:serviceaccounts", "system:authenticated"]}}
        if bound.audience_aware:
            status["audiences"] = audiences
        return status


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    fake = FakeApiServer(tokens={GOOD: Bound(AGENT_SA, "gpu-node-1")})
    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    fake.released.set()
    if fake.gate is not None:
        fake.gate.set()
    await runner.cleanup()


@pytest.fixture
def own_token(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "token"
    path.write_text(OWN + "\n")
    return path


def _settings(url: str, token_file: pathlib.Path, **more: Any) -> tenants.AgentReviewSettings:
    return tenants.AgentReviewSettings(service_accounts=[AGENT_SA], api_server=url,
                                       token_file=str(token_file), **more)


@pytest.fixture
async def reviewer(api: FakeApiServer,
                   own_token: pathlib.Path) -> AsyncIterator[token_review.TokenReviewer]:
    r = token_review.TokenReviewer(_settings(api.url, own_token), cache_ttl_s=0)
    yield r


# -- answers ----------------------------------------------------------------------------

async def test_an_agents_token_names_its_node(api: FakeApiServer,
                                              reviewer: token_review.TokenReviewer) -> None:
    assert await reviewer.node_of(GOOD) == "gpu-node-1"
    (_, body), = api.seen
    assert body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {"token": GOOD, "audiences": ["synapse-agent"]}}


async def test_a_token_for_another_audience_is_refused(
        api: FakeApiServer, reviewer: token_review.TokenReviewer) -> None:
    api.tokens[jwt("api-aud-agent-token-on-x")] = Bound(AGENT_SA, "gpu-node-1",
                                                    audiences=("https://kubernetes.default.svc",))
    assert await reviewer.node_of(jwt("api-aud-agent-token-on-x")) is None


async def test_an_audience_unaware_answer_is_refused(
        api: FakeApiServer, reviewer: token_review.TokenReviewer) -> None:
    # authenticated, right account and node, but nothing says it was meant for us
    api.tokens[jwt("webhook-agent-token-on-x")] = Bound(AGENT_SA, "gpu-node-1", audience_aware=False)
    assert await reviewer.node_of(jwt("webhook-agent-token-on-x")) is None


async def test_another_service_account_is_refused(
        api: FakeApiServer, reviewer: token_review.TokenReviewer,
        caplog: pytest.LogCaptureFixture) -> None:
    api.tokens[jwt("cp-agent-token-on-x")] = Bound(OTHER_SA, "gpu-node-1")
    with caplog.at_level(logging.INFO, "synapse.controlplane.token_review"):
        assert await reviewer.node_of(jwt("cp-agent-token-on-x")) is None
        assert await reviewer.node_of(jwt("cp-agent-token-on-x")) is None
    refusals = [r.getMessage() for r in caplog.records]
    assert refusals == [f"agent token refused: service account {OTHER_SA!r} is not an "
                        "agent account"]       # once per distinct reason


async def test_a_token_without_a_node_claim_is_refused(
        api: FakeApiServer, reviewer: token_review.TokenReviewer,
        caplog: pytest.LogCaptureFixture) -> None:
    api.tokens[jwt("old-agent-token-on-x")] = Bound(AGENT_SA, None)
    with caplog.at_level(logging.INFO, "synapse.controlplane.token_review"):
        assert await reviewer.node_of(jwt("old-agent-token-on-x")) is None
    assert "carries no node name (Kubernetes < 1.30" in caplog.text


async def test_an_unauthenticated_token_is_refused(
        api: FakeApiServer, reviewer: token_review.TokenReviewer) -> None:
    assert await reviewer.node_of(jwt("forged-agent-token-on-x")) is None
    # whatever else the answer says
    api.tokens[jwt("expired-agent-token-on-x")] = Bound(AGENT_SA, "gpu-node-1", authenticated=False)
    assert await reviewer.node_of(jwt("expired-agent-token-on-x")) is None
    assert len(api.seen) == 2


# -- cannot tell --------------------------------------------------------------------------

@pytest.mark.parametrize(("answer", "says"), [
    ("500", "HTTP 500"),
    ("401", "does not accept the control plane's own token"),
    ("403", "create on tokenreviews"),
    ("garbage", "not JSON"),
    ("no-status", "no status"),
])
async def test_an_answer_that_says_nothing_is_unavailable(
        api: FakeApiServer, reviewer: token_review.TokenReviewer, answer: str,
        says: str) -> None:
    api.answer = answer
    with pytest.raises(token_review.ReviewUnavailable, match=says):
        await reviewer.node_of(GOOD)


async def test_a_refused_connection_is_unavailable(own_token: pathlib.Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]           # closed again: nothing listens there
    r = token_review.TokenReviewer(_settings(f"http://127.0.0.1:{port}", own_token))
    with pytest.raises(token_review.ReviewUnavailable, match="cannot connect"):
        await r.node_of(GOOD)


async def test_a_silent_api_server_is_unavailable(api: FakeApiServer,
                                                  own_token: pathlib.Path) -> None:
    api.answer = "slow"
    r = token_review.TokenReviewer(_settings(api.url, own_token, timeout_s=0.2))
    with pytest.raises(token_review.ReviewUnavailable, match="no answer in time"):
        await r.node_of(GOOD)


async def test_a_missing_ca_file_is_unavailable(own_token: pathlib.Path,
                                                tmp_path: pathlib.Path) -> None:
    r = token_review.TokenReviewer(_settings("https://127.0.0.1:1", own_token,
                                             ca_file=str(tmp_path / "none.crt")))
    with pytest.raises(token_review.ReviewUnavailable, match=r"agent_review\.ca_file"):
        await r.node_of(GOOD)


# -- our own credentials ------------------------------------------------------------------

async def test_the_control_planes_own_token_is_sent_and_reread_when_rotated(
        api: FakeApiServer, reviewer: token_review.TokenReviewer,
        own_token: pathlib.Path) -> None:
    await reviewer.node_of(GOOD)
    await asyncio.to_thread(own_token.write_text, "control-plane-own-token-2-rotated\n")
    await reviewer.node_of(GOOD)
    assert [auth for auth, _ in api.seen] == [
        f"Bearer {OWN}", "Bearer control-plane-own-token-2-rotated"]


async def test_an_unreadable_own_token_is_unavailable(
        api: FakeApiServer, reviewer: token_review.TokenReviewer,
        own_token: pathlib.Path) -> None:
    await asyncio.to_thread(own_token.unlink)
    with pytest.raises(token_review.ReviewUnavailable, match=r"agent_review\.token_file"):
        await reviewer.node_of(GOOD)
    assert api.seen == []


# -- load -------------------------------------------------------------------------------

async def test_reviews_beyond_the_cap_wait_for_a_place_and_past_the_queue_are_refused(
        api: FakeApiServer, own_token: pathlib.Path) -> None:
    api.gate = asyncio.Event()
    for i in range(4):
        api.tokens[jwt(f"t{i}-agent-token-on")] = Bound(AGENT_SA, f"gpu-node-{i}")
    r = token_review.TokenReviewer(_settings(api.url, own_token, max_concurrent=2),
                                   max_waiting=1)
    held = [asyncio.create_task(r.node_of(jwt(f"t{i}-agent-token-on"))) for i in range(2)]
    for _ in held:
        await api.arrivals.get()
    waiting = asyncio.create_task(r.node_of(jwt("t2-agent-token-on")))
    await asyncio.sleep(0.05)
    assert not waiting.done() and len(api.seen) == 2    # waits, has not reached the server
    with pytest.raises(token_review.ReviewUnavailable, match="max_concurrent"):
        await r.node_of(jwt("t3-agent-token-on"))         # the queue is full: at once
    api.gate.set()
    assert await asyncio.gather(*held) == ["gpu-node-0", "gpu-node-1"]
    assert await waiting == "gpu-node-2"
    assert len(api.seen) == 3


@pytest.mark.parametrize("token", [
    "random-garbage-agent-token-on", "a.b.agent-token-on", "a.b.c.d",
    jwt("other-audience-agent-token-on", audience="kubernetes"),
    jwt("expired-agent-token-on", exp=1000.0),
    "x" * 20_000,
], ids=["not-a-jwt", "claims-not-json", "four-parts", "audience", "expired", "huge"])
async def test_a_token_that_cannot_be_an_agents_is_refused_without_asking(
        api: FakeApiServer, reviewer: token_review.TokenReviewer, token: str) -> None:
    """Whoever reaches the gRPC port can present tokens: those that are not JWTs for our
    audience, unexpired, never become requests to the API server."""
    api.tokens[token] = Bound(AGENT_SA, "gpu-node-1")   # the server would even accept it
    assert await reviewer.node_of(token) is None
    assert api.seen == []


async def test_an_accepted_token_is_remembered_briefly(api: FakeApiServer,
                                                       own_token: pathlib.Path) -> None:
    now = [100.0]
    r = token_review.TokenReviewer(_settings(api.url, own_token), clock=lambda: now[0],
                                   cache_ttl_s=30)
    assert await r.node_of(GOOD) == "gpu-node-1"
    assert await r.node_of(GOOD) == "gpu-node-1"
    assert len(api.seen) == 1
    assert await r.node_of(jwt("forged-agent-token-on")) is None
    assert await r.node_of(jwt("forged-agent-token-on")) is None
    assert len(api.seen) == 3           # refusals are asked again
    now[0] += 31
    assert await r.node_of(GOOD) == "gpu-node-1"
    assert len(api.seen) == 4


# -- secrets ----------------------------------------------------------------------------

async def test_no_token_reaches_a_log_line_an_error_or_repr(
        api: FakeApiServer, own_token: pathlib.Path,
        caplog: pytest.LogCaptureFixture) -> None:
    api.tokens[jwt("a-agent-token-on-other-sa")] = Bound(OTHER_SA, "n")
    api.tokens[jwt("b-agent-token-on-no-node")] = Bound(AGENT_SA, None)
    api.tokens[jwt("c-agent-token-on-aud")] = Bound(AGENT_SA, "n", audiences=("x",))
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        # a second: the reviews that answer must not time out on a loaded machine (only
        # the silent one does)
        r = token_review.TokenReviewer(_settings(api.url, own_token, timeout_s=1.0))
        texts.append(repr(r))
        for token in (*api.tokens, jwt("forged-agent-token-on-x")):
            await r.node_of(token)
        for answer in ("500", "403", "garbage", "slow"):
            api.answer = answer
            with pytest.raises(token_review.ReviewUnavailable) as err:
                await r.node_of(jwt("d-agent-token-on-failing"))
            texts.append(str(err.value))
    texts += [rec.getMessage() for rec in caplog.records]
    assert len(caplog.records) >= 3
    for text in texts:
        assert SECRET_MARK not in text and OWN not in text, text


async def test_an_error_that_quotes_the_token_is_redacted(
        own_token: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    async def echo(request: web.Request) -> web.Response:
        spec = (await request.json())["spec"]
        return web.json_response({"status": {"authenticated": False,
                                              "error": f"bad token {spec['token']}"}})
    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        r = token_review.TokenReviewer(_settings(f"http://127.0.0.1:{runner.addresses[0][1]}",
                                                 own_token))
        with caplog.at_level(logging.INFO, "synapse.controlplane.token_review"):
            assert await r.node_of(GOOD) is None
    finally:
        await runner.cleanup()
    assert "bad token <token>" in caplog.text and GOOD not in caplog.text


# -- settings ---------------------------------------------------------------------------

def _cp(review: dict[str, Any], host: str = "0.0.0.0") -> config.ControlPlaneSettings:
    return config.ControlPlaneSettings.model_validate(
        {"grpc": {"host": host},
         "auth": {"agent_review": review, "agent_token": "settings-test-agent-token"}})


def test_the_defaults_are_in_cluster() -> None:
    review = _cp({"service_accounts": [AGENT_SA]}).auth.agent_review
    assert review is not None
    assert (review.api_server, review.audience) == ("https://kubernetes.default.svc",
                                                    "synapse-agent")
    assert review.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert review.ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


@pytest.mark.parametrize("name", [
    "synapse-agent", "system:serviceaccount:synapse", "system:serviceaccount::agent",
    "system:serviceaccount:Synapse:agent", "system:serviceaccounts:synapse",
    "system:serviceaccount:synapse:agent:extra", "system:node:gpu-node-1",
])
def test_a_service_account_not_written_in_full_is_refused(name: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        _cp({"service_accounts": [AGENT_SA, name]})
    assert "auth.agent_review.service_accounts" in str(err.value)
    assert "service_accounts.1" in str(err.value)


def test_no_service_account_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"agent_review\.service_accounts"):
        _cp({"service_accounts": []})


@pytest.mark.parametrize(("url", "ok"), [
    ("https://kubernetes.default.svc", True), ("https://10.0.0.1:6443", True),
    ("http://127.0.0.1:8001", True), ("http://localhost:8001", True), ("http://[::1]:1", True),
    ("http://kubernetes.default.svc", False), ("http://10.0.0.1:6443", False),
    ("ftp://127.0.0.1", False), ("kubernetes.default.svc", False),
])
def test_plain_http_only_to_loopback(url: str, ok: bool) -> None:
    review = {"service_accounts": [AGENT_SA], "api_server": url}
    if ok:
        _cp(review)
        return
    with pytest.raises(pydantic.ValidationError) as err:
        _cp(review)
    assert "auth.agent_review.api_server" in str(err.value)


@pytest.mark.parametrize(("field", "value"), [("timeout_s", 0), ("max_concurrent", 0),
                                              ("audience", "")])
def test_limits_are_checked(field: str, value: Any) -> None:
    with pytest.raises(pydantic.ValidationError, match=re.escape(f"agent_review.{field}")):
        _cp({"service_accounts": [AGENT_SA], field: value})


def test_agent_review_keeps_the_shared_token_on_the_control_plane() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"agent_review: needs agent_token"):
        config.ControlPlaneSettings.model_validate(
            {"auth": {"agent_review": {"service_accounts": [AGENT_SA]}}})
