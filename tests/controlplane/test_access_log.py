"""The access log (issue 19): one JSON line per API request, as ``--log-format json``
writes it (the process's own formatter and redaction filter on the ``synapse.access``
logger), through a real control plane in front of recording backends."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import zlib
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from controlplane.core import access_log
from synapse_common import logs
from tests.controlplane import cp_testing as t

MSGS = [{"role": "user", "content": "hi"}]


async def request_ids(client: openai.AsyncOpenAI, n: int) -> list[str]:
    """``n`` chat completions for "llama": the request id each answer carried."""
    ids = []
    for _ in range(n):
        raw = await client.chat.completions.with_raw_response.create(
            model="llama", messages=MSGS)
        ids.append(raw.headers["x-request-id"])
    return ids


@contextlib.contextmanager
def access_lines() -> Iterator[list[dict[str, Any]]]:
    """The access-log lines written meanwhile, parsed (JSON format, keys redacted)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RedactingFilter([t.KEY_A, t.KEY_B, t.ADMIN]))
    logger = logging.getLogger(access_log.LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)       # (setLevel, unlike assigning, clears the cache)
    logger.addHandler(handler)
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        lines.extend(json.loads(line) for line in out.getvalue().splitlines())


async def test_a_line_per_request_with_what_happened() -> None:
    async with t.backends(("bad", "500"), ("good", "ok")) as (bad, good):
        s = t.round_robin(bad, good)
        async with t.running(s) as cp:
            client = cp.client()
            with access_lines() as lines:
                ids = await request_ids(client, 2)
                chunks = await client.chat.completions.create(
                    model="llama", messages=MSGS, stream=True,
                    stream_options={"include_usage": True})
                [c async for c in chunks]
                with pytest.raises(openai.AuthenticationError):
                    await cp.client(key="sk-not-a-key-0123456789").models.list()
            await client.close()
    assert len(lines) == 4, lines
    first, second, streamed, refused = lines
    assert [first["request_id"], second["request_id"]] == ids
    for line in (first, second, streamed):
        assert line["msg"] == "POST /v1/chat/completions 200"
        assert line["logger"] == "synapse.access" and line["level"] == "info"
        assert (line["tenant"], line["model"], line["model_served"]) == ("a", "llama", t.MODEL)
        assert (line["status"], line["backend"], line["fallback"]) == (200, "static/good", "")
        assert (line["prompt_tokens"], line["completion_tokens"]) == (5, 3)
        assert line["cached_tokens"] is None        # the backend did not report it
        assert line["usage_estimated"] is False     # the engine's own counts
        assert 0 <= line["ttft_ms"] <= line["duration_ms"]
    # round robin: one of the two started with the failing backend
    assert sorted([first["retries"], second["retries"]]) == [0, 1]
    assert refused["status"] == 401 and refused["tenant"] == ""
    assert refused["path"] == "/v1/models" and refused["prompt_tokens"] is None


async def test_a_stream_cut_short_logs_the_estimate_it_is_billed_with() -> None:
    async with t.backends(("one", "break")) as (one,):
        async with t.running(t.settings(upstreams=[t.upstream("one", one.url)])) as cp:
            client = cp.client()
            with access_lines() as lines:
                chunks = await client.chat.completions.create(
                    model="llama", messages=MSGS, stream=True)
                with pytest.raises(openai.APIError):
                    [c async for c in chunks]
            await client.close()
    (line,) = lines
    assert line["broken"] is True and line["usage_estimated"] is True
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 1    # "hello"


async def test_keys_never_appear_even_when_a_client_sends_one_as_the_model() -> None:
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(t.settings(upstreams=[t.upstream("one", one.url)])) as cp:
            client = cp.client()
            with access_lines() as lines:
                with pytest.raises(openai.NotFoundError):
                    await client.chat.completions.create(model=t.KEY_B, messages=MSGS)
                await client.chat.completions.create(model="llama", messages=MSGS)
            await client.close()
    text = json.dumps(lines)
    assert len(lines) == 2 and lines[0]["status"] == 404 and lines[0]["model"] == "***"
    assert not [k for k in (t.KEY_A, t.KEY_B, t.ADMIN) if k in text]


async def test_sampling_keeps_the_hashed_share_and_every_error() -> None:
    async with t.backends(("one", "ok"), ("bad", "500")) as (one, bad):
        s = t.settings(upstreams=[t.upstream("one", one.url),
                                  t.upstream("bad", bad.url, models=["broken"])],
                       models=[{"name": t.MODEL, "aliases": ["llama"]}, {"name": "broken"}],
                       access_log={"sample_ratio": 0.5})
        async with t.running(s) as cp:
            client = cp.client()
            with access_lines() as lines:
                ids = await request_ids(client, 40)
                for _ in range(3):
                    with pytest.raises(openai.APIStatusError):
                        await client.chat.completions.create(model="broken", messages=MSGS)
            await client.close()
            sampled = cp.services.access_log
    kept = [i for i in ids if sampled.keeps(i, error=False)]
    assert 0 < len(kept) < 40
    assert [line["request_id"] for line in lines if line["status"] == 200] == kept
    assert [line["status"] for line in lines if line["status"] != 200] == [502] * 3


def test_a_client_cannot_choose_request_ids_that_are_never_logged() -> None:
    """The sampling hash is keyed by a secret of the process: ids kept by one process are
    not those kept by another (a client that knew the hash chose ids never logged), not
    even ids the client made collide under CRC-32 (the first key tried, a seeded CRC, kept
    or dropped each such group whole)."""
    ids = [f"id-{i}" for i in range(400)]
    policy = access_log.Policy(sample_ratio=0.5)
    first, second = access_log.AccessLog(policy), access_log.AccessLog(policy)
    kept_first = [first.keeps(i, error=False) for i in ids]
    assert kept_first != [second.keeps(i, error=False) for i in ids]
    assert kept_first != [zlib.crc32(i.encode()) < 2**31 for i in ids]
    assert 100 < sum(kept_first) < 300
    # ids of one length whose CRC-32 collide: a seeded CRC kept or dropped them together
    assert any(first.keeps(a, error=False) != first.keeps(b, error=False)
               for a, b in _crc_collisions(16))


def _crc_collisions(n: int) -> list[tuple[str, str]]:
    """``n`` pairs of distinct 8-character ids with equal CRC-32s (a birthday search)."""
    import random
    rng = random.Random(7)
    seen: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    while len(pairs) < n:
        rid = "".join(rng.choices(alphabet, k=8))
        crc = zlib.crc32(rid.encode())
        other = seen.setdefault(crc, rid)
        if other != rid:
            pairs.append((other, rid))
    return pairs


async def test_off_by_config_or_below_the_log_level() -> None:
    async with t.backends(("one", "ok")) as (one,):
        s = t.settings(upstreams=[t.upstream("one", one.url)], access_log={"enabled": False})
        async with t.running(s) as cp:
            client = cp.client()
            with access_lines() as lines:
                await client.chat.completions.create(model="llama", messages=MSGS)
            await client.close()
    assert lines == []
    quiet = access_log.AccessLog(access_log.Policy(), logging.getLogger("synapse.access.q"))
    logging.getLogger("synapse.access.q").setLevel(logging.WARNING)
    assert not quiet.wanted()


async def test_the_id_the_engine_got_is_logged_beside_the_clients() -> None:
    async with t.backends(("good", "ok")) as (good,):
        async with t.running(t.round_robin(good)) as cp:
            client = cp.client()
            with access_lines() as lines:
                await client.chat.completions.create(
                    model="llama", messages=MSGS, extra_headers={"x-request-id": "mine-1"})
                await request_ids(client, 1)       # no id of its own: one id for both
            await client.close()
    chosen, generated = lines
    engine_got = {k.lower(): v for k, v in good.headers[0].items()}["x-request-id"]
    assert chosen["request_id"] == "mine-1" and chosen["engine_request_id"] == engine_got
    assert engine_got != "mine-1"
    assert "engine_request_id" not in generated     # the same as request_id
