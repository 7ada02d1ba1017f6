"""The ``llamacpp`` upstream kind against llama.cpp's real ``llama-server`` (issue 17).

llama-server runs with ``--api-key``: it refuses requests without the key (401), so an
answer proves the key reached it, and it guards ``/metrics`` with the same key while
``/health`` stays public — the probe and the scrape each get what they need. It serves
the SmolLM2 GGUF under ``--alias``; the control plane knows the model by its canonical
name and answers with the name the client asked for.

Not part of ``make test`` (marker ``llamacpp``): llama-server is the engine tier's optional
part, built by ``make engines-llamacpp`` (Debian's clang-19 and libomp-19-dev installed as
root, then about 13 CPU-minutes of C++). ``make test-llamacpp`` builds it when missing
and runs this file. Without it the test fails saying so; it never skips.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from controlplane.adapters import prober
from controlplane.api import upstream_wiring
from controlplane.core import upstream_kinds, upstream_metrics
from synapse_common import engines
from tests import harness
from tests.controlplane import cp_testing as t

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(600)]

CANONICAL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIAS = "smollm2-q4"
KEY = "sk-llama-server-1e7c5a9b3d0f2468"


@pytest.fixture
def llama_server(processes: harness.ProcessPool) -> str:
    try:
        binary, gguf = engines.find().require_llama_server()
    except engines.EngineTierMissing as exc:
        pytest.fail(f"this test runs llama.cpp's llama-server: {exc}", pytrace=False)
    port = harness.free_port()
    processes.start("llama-server", [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
        "-c", "4096", "-no-kvu", "-fa", "off", "--metrics", "--api-key", KEY,
        "--alias", ALIAS], ready_url=f"http://127.0.0.1:{port}/health", timeout=120)
    return f"http://127.0.0.1:{port}"


async def test_llama_server_behind_a_llamacpp_upstream(
        llama_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = t.settings(
        models=[{"name": CANONICAL, "aliases": ["smol"]}],
        http={"upstream_first_byte_timeout_s": 60.0, "upstream_idle_timeout_s": 60.0},
        upstreams=[{"name": "llama", "url": llama_server + "/v1", "kind": "llamacpp",
                    "models": [CANONICAL], "model_names": {CANONICAL: ALIAS},
                    "api_key": KEY}])
    async with t.running(s) as cp:
        await _routable(cp)
        target = upstream_wiring.targets(cp.services)[0]
        assert target.url.endswith("/health") and not target.headers, "a public probe"
        text = await prober.metrics_text(cp.services.upstream, target)
        assert text is not None and "llamacpp:requests_processing" in text, "read with the key"
        names = upstream_kinds.KINDS["llamacpp"].metrics
        assert names is not None and upstream_metrics.parse(text, names).ok
        keyless = dataclasses.replace(target, metrics_headers={})
        assert await prober.metrics_text(cp.services.upstream, keyless) is None   # 401
        client = cp.client().with_options(timeout=120)
        raw = await client.chat.completions.with_raw_response.create(
            model="smol", messages=[{"role": "user", "content": "Say hello."}],
            temperature=0, max_tokens=8)
        reply = raw.parse()       # llama-server answers only with the key (401 otherwise)
        assert raw.headers["x-synapse-backend"] == "static/llama"
        assert (reply.system_fingerprint or "").startswith("b")   # llama.cpp's build id
        assert reply.model == "smol" and (reply.choices[0].message.content or "").strip()
        stream = await client.chat.completions.create(
            model=CANONICAL, messages=[{"role": "user", "content": "Count to three."}],
            temperature=0, max_tokens=8, stream=True)
        chunks = [c async for c in stream]
        assert chunks and {c.model for c in chunks} == {CANONICAL}
        await client.close()
    assert KEY not in caplog.text


async def _routable(cp: t.RunningCP) -> None:
    for _ in range(300):
        if any(not why for _, why in cp.services.registry.all_backends()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("llama-server never became routable")
