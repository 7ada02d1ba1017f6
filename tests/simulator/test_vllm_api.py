"""vLLM mode through a real process and the official openai client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from synapse_common import clock as clocks
from synapse_common import tokens
from tests import harness
from tests.simulator.conftest import MODEL, Sim, flags, in_process, samples, start, value


@pytest.fixture(scope="module")
def sim(module_pool: harness.ProcessPool) -> Sim:
    return start(module_pool, "--time-scale", "0", "--seed", "7", name="sim-vllm")


@pytest.fixture
def client(sim: Sim) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0,
                       timeout=30) as c:
        yield c


def get(url: str) -> tuple[int, bytes]:
    status, _, raw = harness.http(url)
    return status, raw


def post(url: str, body: bytes) -> tuple[int, dict]:
    status, _, raw = harness.http(url, body)
    return status, json.loads(raw)


def metrics(sim: Sim) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, body = get(sim.url + "/metrics")
    assert status == 200
    return samples(body.decode())


def test_chat_completion_with_usage_labelled_simulated(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.system_fingerprint == "synapse-simulator"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == tokens.count_tokens(tokens.render_chat(messages))
    assert resp.usage.completion_tokens == 12 and choice.finish_reason == "length"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    tagged = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                            extra_headers={"X-Request-Id": "req-42"})
    assert tagged.id == "chatcmpl-req-42"  # as vLLM does


def test_every_answer_carries_the_request_id_as_vllm_with_request_id_headers(
        client: openai.OpenAI, sim: Sim) -> None:
    """The control plane tells an answer that is not its request's by this echo (a
    keep-alive connection put off by one): answers, streams and errors carry it."""
    messages = [{"role": "user", "content": "Whose answer?"}]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=1, extra_headers={"X-Request-Id": "r-1"})
    assert raw.headers["x-request-id"] == "r-1"
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=messages, max_tokens=2, stream=True,
            extra_headers={"X-Request-Id": "r-2"}) as streamed:
        assert streamed.headers["x-request-id"] == "r-2"
    wrong = client.chat.completions.with_raw_response.create   # an error answer
    with pytest.raises(openai.NotFoundError) as info:
        wrong(model="no-such-model", messages=messages, extra_headers={"X-Request-Id": "r-3"})
    assert info.value.response.headers["x-request-id"] == "r-3"
    _, headers, _ = harness.http(sim.url + "/health")   # none sent: a new one, as vLLM
    assert len(headers["X-Request-Id"]) == 32


def test_same_prompt_and_seed_answer_the_same(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Repeatable?"}]
    a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, seed=5)
    b = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, seed=5)
    c = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, seed=6)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content


def test_n_choices_and_natural_stop(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Several answers"}], n=3,
        max_tokens=2000)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 3
    assert all(c.finish_reason == "stop" for c in resp.choices)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == sum(
        tokens.count_tokens(c.message.content or "") for c in resp.choices)


def test_stop_string_ends_the_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Stop test"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60,
                                          extra_body={"ignore_eos": True})
    text = full.choices[0].message.content or ""
    word = text.split()[8]
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60,
                                         stop=[" " + word], extra_body={"ignore_eos": True})
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and text.startswith(choice.message.content or "")
    assert len(choice.message.content or "") < len(text)


def test_streaming_chat_chunks_like_vllm(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream please"}], max_tokens=5,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(content) == 5 and all(content)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert {c.id for c in chunks} == {chunks[0].id}
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream please"}], max_tokens=5)
    assert "".join(content) == plain.choices[0].message.content


async def test_stream_ends_with_done_marker(sim: Sim) -> None:
    body = {"model": MODEL, "prompt": "raw sse", "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.url + "/v1/completions", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"]


def test_completions_non_streaming_and_streaming(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=4)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage is not None and resp.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="one", max_tokens=4, stream=True) if c.choices)
    assert streamed == resp.choices[0].text


def test_models_health_and_version(sim: Sim, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "synapse-simulator"
    assert get(sim.url + "/health") == (200, b"")
    status, body = get(sim.url + "/version")
    assert status == 200 and json.loads(body)["simulated"] is True


def test_errors_use_the_openai_envelope(sim: Sim, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user",
                                                                "content": "x"}])
    assert missing.value.status_code == 404 and "does not exist" in str(missing.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
    status, body = post(sim.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "BadRequestError"
    status, body = post(sim.url + "/v1/completions",
                        json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = post(sim.url + "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "x", "max_tokens": 10**6}).encode())
    assert status == 400 and "maximum context length" in body["error"]["message"]
    status, raw = get(sim.url + "/v1/nothing-here")
    assert status == 404 and json.loads(raw)["error"]["code"] == 404


def test_metrics_parse_and_carry_every_vllm_name(sim: Sim, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "m"}],
                                   max_tokens=3)
    parsed = metrics(sim)
    labels = {"model_name": MODEL, "engine": "0"}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count",
                 "vllm:inter_token_latency_seconds_count"):
        value(parsed, name, **labels)
    assert value(parsed, "vllm:request_success_total", finished_reason="length", **labels) >= 1
    assert value(parsed, "vllm:generation_tokens_total", **labels) >= 3
    info = parsed["vllm:cache_config_info"][0][0]
    assert info["block_size"] == "16" and info["num_gpu_blocks"] == "28000"
    assert info["engine"] == "0"


def test_the_engine_clock_counts_modelled_step_time_not_host_time(
        sim: Sim, client: openai.OpenAI) -> None:
    before = value(metrics(sim), "simulator:simulated_seconds_total")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "c"}],
                                   max_tokens=4)
    advanced = value(metrics(sim), "simulator:simulated_seconds_total") - before
    # four steps of the realistic profile at least (prefill + decode base 12 ms each),
    # although the simulator runs unscaled (time scale 0) and took far less real time
    assert 4 * 0.012 <= advanced < 1.0


def test_a_shared_long_prefix_is_served_from_the_prefix_cache(sim: Sim,
                                                               client: openai.OpenAI) -> None:
    system = {"role": "system", "content": " ".join(f"rule{i} applies" for i in range(400))}
    before = value(metrics(sim), "vllm:prefix_cache_hits_total")
    computed_before = json.loads(get(sim.url + "/sim/state")[1])["prefill_computed_tokens"]
    first = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "first question"}],
        max_tokens=2)
    computed_first = json.loads(get(sim.url + "/sim/state")[1])["prefill_computed_tokens"]
    second = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "another question"}],
        max_tokens=2)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert cached > 0.9 * first.usage.prompt_tokens
    assert value(metrics(sim), "vllm:prefix_cache_hits_total") - before == cached
    # The second request prefilled only what was not cached: that is what shortens its TTFT
    # (the modelled step time is proportional to prefilled tokens; see test_scheduler).
    computed_second = json.loads(get(sim.url + "/sim/state")[1])["prefill_computed_tokens"]
    assert computed_first - computed_before == first.usage.prompt_tokens
    assert computed_second - computed_first == second.usage.prompt_tokens - cached


def test_a_cache_salt_partitions_the_prefix_cache_as_vllms(sim: Sim,
                                                           client: openai.OpenAI) -> None:
    system = {"role": "system", "content": " ".join(f"salted{i} rule" for i in range(400))}

    def cached(salt: str, question: str) -> int:
        reply = client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}],
            max_tokens=2, extra_body={"cache_salt": salt})
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        return reply.usage.prompt_tokens_details.cached_tokens or 0

    assert cached("tenant-a", "first") == 0
    assert cached("tenant-b", "second") == 0       # the same prefix under another salt
    assert cached("tenant-a", "third") > 0
    status, error = post(sim.url + "/v1/chat/completions", json.dumps({
        "model": MODEL, "messages": [system], "max_tokens": 1, "cache_salt": "a/b"}).encode())
    assert status == 400 and error["error"]["param"] == "cache_salt"


async def test_a_third_request_waits_when_max_num_seqs_is_2(
        processes: harness.ProcessPool) -> None:
    slow = start(processes, "--time-scale", "1", "--max-num-seqs", "2", name="sim-seqs")
    body = {"model": MODEL, "prompt": "long", "max_tokens": 5000, "stream": True,
            "ignore_eos": True}

    async def parsed() -> dict[str, list[tuple[dict[str, str], float]]]:
        async with session.get(slow.url + "/metrics") as resp:
            return samples(await resp.text())

    async with aiohttp.ClientSession() as session:
        streams = [await session.post(slow.url + "/v1/completions", json=body)
                   for _ in range(3)]
        for _ in range(200):
            m = await parsed()
            if value(m, "vllm:num_requests_waiting") == 1:
                break
            await asyncio.sleep(0.05)
        assert value(m, "vllm:num_requests_running") == 2
        assert value(m, "vllm:num_requests_waiting") == 1
        assert 0 < value(m, "vllm:kv_cache_usage_perc") < 1
        for resp in streams:
            resp.close()  # the clients leave: their sequences are aborted
        for _ in range(200):
            m = await parsed()
            if value(m, "vllm:request_success_total", finished_reason="abort") == 3:
                break
            await asyncio.sleep(0.05)
        assert value(m, "vllm:num_requests_running") == 0
        assert value(m, "vllm:request_success_total", finished_reason="abort") == 3


async def test_kv_exhaustion_preempts_and_every_request_still_completes(
        processes: harness.ProcessPool) -> None:
    small = start(processes, "--time-scale", "0", "--num-gpu-blocks", "8", "--block-size",
                  "4", name="sim-kv")
    body = {"model": MODEL, "max_tokens": 14, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> dict:
            async with session.post(small.url + "/v1/completions",
                                    json={**body, "prompt": f"prompt number {i}"}) as resp:
                assert resp.status == 200
                return await resp.json()

        answers = await asyncio.gather(*(one(i) for i in range(3)))
        async with session.get(small.url + "/metrics") as resp:
            m = samples(await resp.text())
    assert all(a["usage"]["completion_tokens"] == 14 for a in answers)
    assert value(m, "vllm:num_preemptions_total") >= 1
    assert value(m, "vllm:kv_cache_usage_perc") == 0


async def test_answer_origin_names_the_producing_request_in_whole_answers() -> None:
    """``--answer-origin``: a cached replay gets a fresh id, so tests prove where an
    answer came from by this field; off by default (vLLM has no such field)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for argv, expected in ((["--time-scale", "0", "--answer-origin"], "chatcmpl-r-7"),
                           (["--time-scale", "0"], None)):
        async with in_process(flags(*argv), clocks.Time()) as url, \
                aiohttp.ClientSession() as session, session.post(
                    f"{url}/v1/chat/completions", json=body,
                    headers={"X-Request-Id": "r-7"}) as r:
            answer = await r.json()
        assert answer.get("origin") == expected and answer["id"] == "chatcmpl-r-7"
