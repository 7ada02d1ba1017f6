"""Each fault knob, by flag and at run time through /sim/faults: on a real process, and
the timed ones (slow start, stall) in process on virtual time, so a test waits for none
of their seconds and asserts how many there were."""

from __future__ import annotations

import asyncio

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from simulator import faults
from tests import harness
from tests.clock import stepped_time
from tests.simulator.conftest import MODEL, Sim, flags, in_process, json_call, start

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "fault?"}], "max_tokens": 4}


def test_error_rate_answers_500_with_an_envelope(processes: harness.ProcessPool) -> None:
    sim = start(processes, "--time-scale", "0", "--error-rate", "1")
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(**CHAT)
    assert "fault injection" in str(err.value)
    status, body = json_call(sim.url + "/sim/faults", {"error_rate": 0})
    assert status == 200 and body["error_rate"] == 0
    assert client.chat.completions.create(**CHAT).choices[0].message.content


def test_crash_after_n_requests_exits_non_zero(processes: harness.ProcessPool) -> None:
    sim = start(processes, "--time-scale", "0", "--crash-after", "2")
    for _ in range(2):
        status, body = json_call(sim.url + "/v1/chat/completions", CHAT)
        assert status == 200 and body["choices"]
    assert sim.proc.wait(timeout=20) == faults.CRASH_EXIT_CODE
    assert "crash_after=2" in sim.proc.output()


async def call(session: aiohttp.ClientSession, url: str,
               body: object = None) -> tuple[int, dict[str, object]]:
    """GET ``url`` (POST ``body`` as JSON when given): the status and the JSON answer."""
    method = session.get(url) if body is None else session.post(url, json=body)
    async with method as resp:
        return resp.status, await resp.json(content_type=None) if await resp.read() else {}


async def test_slow_start_makes_health_503_for_a_while() -> None:
    timing, clock, _ = stepped_time()
    async with in_process(flags("--time-scale", "0", "--slow-start", "3"), timing) as url, \
            aiohttp.ClientSession() as session:
        status, body = await call(session, url + "/health")
        assert status == 503 and body["error"]["code"] == 503
        status, _ = await call(session, url + "/v1/chat/completions", CHAT)
        assert status == 503
        clock.now += 2.999                  # not a moment before its three seconds
        assert (await call(session, url + "/health"))[0] == 503
        clock.now += 0.001
        assert (await call(session, url + "/health"))[0] == 200
        assert (await call(session, url + "/v1/chat/completions", CHAT))[0] == 200
        status, body = await call(session, url + "/sim/faults", {"slow_start": 30})
        assert status == 200 and body["slow_start_s"] == 30    # set at run time
        assert (await call(session, url + "/health"))[0] == 503
        clock.now += 30                     # thirty seconds from the POST that set it
        assert (await call(session, url + "/health"))[0] == 200


@pytest.fixture
def sim(processes: harness.ProcessPool) -> Sim:
    return start(processes, "--time-scale", "0", "--stall-s", "0.3")


async def test_hang_accepts_and_never_answers_until_lifted(sim: Sim) -> None:
    status, _ = json_call(sim.url + "/sim/faults", {"hang": True})
    assert status == 200
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(sim.url + "/v1/chat/completions", json=CHAT) as resp:
                await resp.read()
        with pytest.raises(asyncio.TimeoutError):
            async with session.get(sim.url + "/health") as resp:
                await resp.read()
        async with session.get(sim.url + "/sim/faults") as resp:
            assert (await resp.json())["hang"] is True
        async with session.post(sim.url + "/sim/faults", json={"hang": False}) as resp:
            assert resp.status == 200
        async with session.post(sim.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200


async def test_stall_mid_stream_then_drop() -> None:
    timing, clock, sleep = stepped_time()
    async with in_process(flags("--time-scale", "0", "--stall-s", "0.3"), timing) as url, \
            aiohttp.ClientSession() as session:
        await call(session, url + "/sim/faults", {"stall_after_chunks": 2})
        body = {**CHAT, "max_tokens": 50, "stream": True}
        events: list[bytes] = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    if line.strip():
                        events.append(line)
        assert len(events) == 2 and b"[DONE]" not in b"".join(events)
        assert sleep.calls == [0.3]         # silent for stall_s, then dropped
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.post(url + "/v1/chat/completions", json=CHAT) as resp:
                await resp.read()
        assert sleep.calls == [0.3, 0.3] and clock.now == pytest.approx(0.6)
        async with session.post(url + "/sim/faults",
                                json={"stall_after_chunks": None}) as resp:
            assert (await resp.json())["stall_after_chunks"] is None
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        assert sleep.calls == [0.3, 0.3]    # no stall once lifted


def test_bad_fault_values_are_400_naming_the_field(sim: Sim) -> None:
    status, body = json_call(sim.url + "/sim/faults", {"error_rate": 3})
    assert status == 400 and body["error"]["param"] == "error_rate"
    status, body = json_call(sim.url + "/sim/faults", {"explode": True})
    assert status == 400 and "explode" in body["error"]["message"]
    status, body = json_call(sim.url + "/sim/faults")
    assert status == 200 and body["error_rate"] == 0
    status, again = json_call(sim.url + "/sim/faults", body)  # GET's answer posts back as is
    assert status == 200 and again["error_rate"] == 0


def test_faults_reach_the_new_routes(processes: harness.ProcessPool) -> None:
    sim = start(processes, "--time-scale", "0", "--error-rate", "1")
    client = anthropic.Anthropic(base_url=sim.url, api_key="x", max_retries=0, timeout=10)
    ask = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(anthropic.InternalServerError) as err:
        client.messages.create(**ask)  # type: ignore[call-overload]
    assert err.value.body["type"] == "error"  # type: ignore[index]  # Anthropic shape
    status, _ = json_call(sim.url + "/v1/responses", {"model": MODEL, "input": "x"})
    assert status == 500
    json_call(sim.url + "/sim/faults", {"error_rate": 0, "stall_after_chunks": 3,
                                      "stall_s": 0.2})
    # three events, silence, then the connection drops mid-body: older SDKs let the
    # transport's error through, anthropic 2.17 and later wrap it in APIConnectionError
    with (pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)) as dropped,
          client.messages.stream(**ask) as s):  # type: ignore[arg-type]
        s.get_final_message()
    error = dropped.value
    cause = error if isinstance(error, httpx2.RemoteProtocolError) else error.__cause__
    assert isinstance(cause, httpx2.RemoteProtocolError)
