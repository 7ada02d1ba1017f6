"""The access log in its ``key=value`` format (``--log-format human``, the default) keeps
one line per request whatever a client puts in the model name or the path: a newline
there forged a whole line (another tenant's, through a path that needs no key), a space
a field, an ESC drove the terminal of whoever reads the log."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import aiohttp
import openai
import pytest
import yarl

from controlplane.core import access_log
from synapse_common import logs
from tests.controlplane import cp_testing as t

MSGS = [{"role": "user", "content": "hi"}]
FORGED = "2026-12-06T04:00:00.000Z INFO    synapse.access: POST /v1/chat/completions 200"


@contextlib.contextmanager
def human_lines() -> Iterator[list[str]]:
    """The access-log lines written meanwhile, as the human formatter writes them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.HumanFormatter())
    logger = logging.getLogger(access_log.LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    lines: list[str] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        lines.extend(out.getvalue().splitlines())


async def test_a_model_name_or_path_cannot_forge_lines_fields_or_escapes() -> None:
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(t.settings(upstreams=[t.upstream("one", one.url)])) as cp:
            client = cp.client()
            with human_lines() as lines:
                with pytest.raises(openai.NotFoundError):
                    await client.chat.completions.create(
                        model=f"llama\n{FORGED} tenant=b\r\x1b[2J", messages=MSGS)
                async with aiohttp.ClientSession() as http:
                    url = yarl.URL(f"{cp.url}/v1/x%0a{FORGED.replace(' ', '%20')}%1b",
                                   encoded=True)
                    async with http.get(url) as resp:     # no key: refused or unknown
                        assert resp.status in (401, 404)
            await client.close()
    assert len(lines) == 2, lines
    model_line, path_line = lines
    assert "\x1b" not in model_line + path_line and "\r" not in model_line
    assert model_line.count(" tenant=") == 1 and " tenant=a " in model_line
    assert "model=llama\\x0a2026-12-06T04:00:00.000Z\\x20INFO" in model_line
    assert "\\x20tenant=b\\x0d\\x1b[2J" in model_line
    assert path_line.count(" tenant=") == 1
    assert "GET /v1/x\\x0a2026-12-06T04:00:00.000Z\\x20INFO" in path_line


async def test_a_clients_request_id_cannot_forge_fields() -> None:
    """A client's ``x-request-id`` is kept when printable ASCII, spaces included."""
    async with t.backends(("one", "ok")) as (one,):
        async with t.running(t.settings(upstreams=[t.upstream("one", one.url)])) as cp:
            client = cp.client()
            with human_lines() as lines:
                await client.chat.completions.create(
                    model="llama", messages=MSGS,
                    extra_headers={"x-request-id": "mine tenant=b model=other"})
            await client.close()
    [line] = lines
    assert line.count(" tenant=") == 1 and " tenant=a " in line
    assert "request_id=mine\\x20tenant=b\\x20model=other" in line


def test_inert_escapes_what_ends_a_line_or_starts_a_field_and_keeps_the_rest() -> None:
    assert access_log.inert("meta-llama/Llama-3.1:8b@v2") == "meta-llama/Llama-3.1:8b@v2"
    assert access_log.inert("modèle-日本") == "modèle-日本"
    assert access_log.inert("a\u2028b\u2029c\x85d\x7fe\tf") == (
        "a\\u2028b\\u2029c\\x85d\\x7fe\\x09f")
    assert access_log.inert("x" * 500) == "x" * access_log.FIELD_MAX
