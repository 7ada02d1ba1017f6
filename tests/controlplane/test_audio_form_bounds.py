"""The audio endpoints' forms over HTTP, against a control plane and a simulated
transcription backend: a form's fields are held to the rules of a JSON body (probe 108
F3, F4), and a body that is not the multipart form its Content-Type says is a 400, not a
500 (F8)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import pytest

from tests import fleet, harness

pytestmark = pytest.mark.timeout(120)

WHISPER = "whisper"
PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("audio-form")
    pool = harness.ProcessPool(work)
    try:
        port = harness.free_port()
        pool.start("whisper", fleet.simulator_argv(port, WHISPER, "--task", "transcription",
                                                   time_scale=0),
                   ready_url=f"http://127.0.0.1:{port}/health")
        http = harness.free_port()
        cfg = fleet.controlplane_config(
            "cp", http, harness.free_port(), work / "cp-data",
            upstreams=[{"name": "whisper", "url": f"http://127.0.0.1:{port}",
                        "models": [WHISPER], "tasks": ["transcription"]}],
            models=[{"name": WHISPER}], http={"max_n": 4})
        url = f"http://127.0.0.1:{http}"
        cp = pool.start("cp", ["synapse", "controlplane", "--config",
                               str(fleet.write_yaml(work / "cp.yaml", cfg))],
                        ready_url=url + "/health")
        harness.wait_until(lambda: fleet.backends_ready(url) == 1, 30,
                           "the transcription upstream to be healthy", proc=cp)
        yield url
    finally:
        pool.stop_all()


async def _upload(base: str, path: str, fields: list[tuple[str, str]],
                  after: bool = False) -> tuple[int, dict[str, object]]:
    """The status and JSON of an upload of ``fields`` before the file (after it when
    ``after``), ``model`` first."""
    form = aiohttp.FormData({"model": WHISPER})
    if not after:
        for name, value in fields:
            form.add_field(name, value)
    form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
    if after:
        for name, value in fields:
            form.add_field(name, value)
    async with aiohttp.ClientSession() as session, session.post(
            base + path, data=form,
            headers={"Authorization": f"Bearer {fleet.TENANT_KEY}"}) as resp:
        return resp.status, json.loads(await resp.read())


async def _refused(base: str, fields: list[tuple[str, str]], param: str) -> None:
    for path in PATHS:
        for after in (False, True):
            status, body = await _upload(base, path, fields, after)
            error = body["error"]
            assert isinstance(error, dict), body
            assert status == 400 and error["param"] == param, (path, after, body)
            assert str(error["message"]).startswith(param + ":"), body


@pytest.mark.parametrize("xargs", [
    '{"kv_transfer_params": "x", "y": NaN}',
    '{"ec_transfer_params": {"remote_host": "10.0.0.1"}, "y": Infinity}',
    '{"kv_transfer_params": {"remote_port": 1e999999}}',
])
async def test_vllm_xargs_the_engine_would_read_but_orjson_cannot_is_refused(
        base: str, xargs: str) -> None:
    """vLLM parses a form's ``vllm_xargs`` with Python's json, which takes NaN and
    Infinity: text orjson refused was passed on unchecked, cache transfer parameters in it."""
    await _refused(base, [("vllm_xargs", xargs)], "vllm_xargs")


@pytest.mark.parametrize(("fields", "param"), [
    ([("n", "512"), ("use_beam_search", "true")], "n"),     # vLLM: beam_width = n
    ([("use_beam_search", "true"), ("n", " 5_12 ")], "n"),  # as pydantic reads a form
    ([("n", "5.0")], "n"),
    ([("n", "1e3")], "n"),
    ([("n", "2"), ("n", "9")], "n"),                        # the engine takes the last
    ([("n", "0")], "n"),
    ([("n", "many")], "n"),
    ([("best_of", "64")], "best_of"),
    ([("max_completion_tokens", "99999999999")], "max_completion_tokens"),
    ([("max_tokens", "1e308")], "max_tokens"),
    ([("temperature", "nan")], "temperature"),
    ([("temperature", "9")], "temperature"),
    ([("top_p", "inf")], "top_p"),
])
async def test_generation_fields_of_a_form_are_bounded_as_in_a_json_body(
        base: str, fields: list[tuple[str, str]], param: str) -> None:
    """``n`` (the beam width under ``use_beam_search``) at most ``http.max_n``, counts at
    most ``validation.MAX_COUNT``, sampling rates in their ranges: the form's fields
    reached the engine unchecked."""
    await _refused(base, fields, param)


async def test_a_form_within_the_bounds_is_served(base: str) -> None:
    fields = [("n", "4"), ("use_beam_search", "true"), ("temperature", "0.2"),
              ("top_p", "1"), ("max_completion_tokens", "64"),
              ("vllm_xargs", '{"custom": 1.5}'), ("language", "en")]
    for path in PATHS:
        status, body = await _upload(base, path, fields)
        assert status == 200, body


@pytest.mark.parametrize("content_type", [
    "multipart/form-data",                          # no boundary
    "multipart/form-data; boundary=OTHER",          # not the body's
    "multipart/form-data; boundary=" + "b" * 71,   # over aiohttp's 70 characters
])
def test_a_body_that_is_not_the_form_its_content_type_says_is_a_400(
        base: str, content_type: str) -> None:
    body = (b"--XyZb\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            + WHISPER.encode() + b"\r\n--XyZb\r\nContent-Disposition: form-data; "
            b"name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--XyZb--\r\n")
    for path in PATHS:
        reply = fleet.request(base, "POST", path, body,
                              headers={"Content-Type": content_type})
        assert reply.status == 400, reply.body
        error = json.loads(reply.body)["error"]
        assert "multipart/form-data" in error["message"], reply.body
        assert error["type"] == "invalid_request_error", reply.body


def test_a_form_that_ends_before_its_closing_boundary_is_a_400(base: str) -> None:
    body = (b"--XyZb\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            + WHISPER.encode() + b"\r\n--XyZb\r\nContent-Disposition: form-data; "
            b"name=\"language\"\r\n\r\nen")
    reply = fleet.request(base, "POST", PATHS[0], body,
                          headers={"Content-Type": "multipart/form-data; boundary=XyZb"})
    assert reply.status == 400 and b"multipart/form-data" in reply.body, reply.body


async def test_a_field_given_twice_is_refused(base: str) -> None:
    """``model`` before the file and another after it: the control plane checked, routed
    and billed the first, and the backend got both (a model the tenant may not use,
    billed as the one it may). Before or after the file, a repeat is a 400."""
    for path in PATHS:
        for after in (False, True):
            status, body = await _upload(base, path, [("model", "whisper-premium")], after)
            error = body["error"]
            assert isinstance(error, dict), body
            assert status == 400 and error["param"] == "model", (path, after, body)
    form = aiohttp.FormData({"model": WHISPER})
    form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
    for value in ("word", "segment"):           # the API's array fields repeat
        form.add_field("timestamp_granularities[]", value)
    async with aiohttp.ClientSession() as session, session.post(
            base + PATHS[0], data=form,
            headers={"Authorization": f"Bearer {fleet.TENANT_KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
