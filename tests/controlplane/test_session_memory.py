"""What the router keeps of a session id a client sends: a bounded key, whatever its length.

A tenant picks its session ids (``x-session-id``, the body's ``user``, Anthropic's
``metadata.user_id``), and ``user`` has no length bound. The sessions table and the routing
mesh's messages to sibling workers hold :func:`router.session_key`, so its size must not
follow the id's: unique megabyte ids would otherwise fill the control plane's memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import aiohttp

from controlplane.core import router
from simulator import app as sim_app
from simulator import config as sim_config
from tests.controlplane import cp_testing as t

BIG = 512 * 1024            # characters of a session id sent in a body
KEY_MAX = 64                # a key's characters, for the tenants of cp_testing


class Recorder:
    """A routing mesh's listener that keeps what it would send to sibling workers."""

    def __init__(self) -> None:
        self.sessions: list[str] = []

    def prefix(self, backend: str, hashes: Sequence[int], capacity_blocks: int,
               restarts: int) -> None:
        pass

    def session(self, session: str, backend: str) -> None:
        self.sessions.append(session)


def test_a_session_key_is_the_same_size_whatever_the_id() -> None:
    short = router.session_key("a", "u")
    for session in ("u" * 300, "x" * BIG, "é" * 1000, "\ud800" * 10):
        key = router.session_key("a", session)
        assert len(key) == len(short)
        assert router.session_tenant(key) == "a"
    assert router.session_key("a", "x" * BIG) != router.session_key("a", "x" * (BIG - 1))
    assert "user@example.com" not in router.session_key("a", "user@example.com")


@contextlib.asynccontextmanager
async def simulator() -> AsyncIterator[str]:
    app = sim_app.build(sim_config.SimulatorSettings(model=t.MODEL, time_scale=0))
    async with t.served(app) as url:
        yield url


async def test_huge_user_fields_leave_bounded_keys_in_the_table_and_on_the_mesh() -> None:
    upstream = {**t.upstream("sim", ""), "tasks": ["generate", "messages"]}
    async with simulator() as url, t.running(t.settings(
            upstreams=[{**upstream, "url": url}],
            http={"max_body_bytes": 4 * BIG})) as cp, aiohttp.ClientSession() as http:
        mesh = Recorder()
        cp.services.router.listener = mesh
        bearer = {"authorization": f"Bearer {t.KEY_A}"}
        anthropic = {"x-api-key": t.KEY_A, "anthropic-version": "2023-06-01"}
        users = [f"{i}" + "u" * BIG for i in range(3)]
        for user in users + users[:1]:          # the first one twice: the same session
            async with http.post(f"{cp.url}/v1/chat/completions", headers=bearer, json={
                    "model": "llama", "max_tokens": 1, "user": user,
                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200, await r.text()
        async with http.post(f"{cp.url}/v1/messages", headers=anthropic, json={
                "model": "llama", "max_tokens": 1, "metadata": {"user_id": "m" * BIG},
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200, await r.text()
        kept = [key for _, key, _ in cp.services.router.sessions.items()]
        assert len(kept) == 4                   # three users, one Anthropic user id
        assert all(len(key) <= KEY_MAX for key in kept + mesh.sessions), kept
        assert len(mesh.sessions) == 5 and mesh.sessions[0] == mesh.sessions[3]


def test_a_session_key_is_the_same_in_every_worker_and_release() -> None:
    """A pod's workers (and replicas of one release, and the next release) must form the
    same key for one session, or session affinity would split across them: pinned
    values, not a digest recomputed by the test."""
    assert router.session_key("team", "user-42") == "4:team:75f59fe5ab99eb6e2c9fe4fcb2434b05"
    assert router.session_key("t", "é\udc80") == "1:t:2dccd1bdb4f6540b96d40cd529d54b2d"
    assert router.session_key("team", "") == ""
