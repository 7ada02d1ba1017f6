"""Sealing Responses ids for a tenant, and finding and rewriting them in answers
(:mod:`controlplane.core.response_ids`)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from controlplane.core import response_ids as ids

SEAL = ids.Seal.from_secrets(None, "sk-admin-0123456789")
ENGINE = "resp_3f9a0c1e5b7d4f62"


def test_an_id_opens_only_for_the_tenant_it_was_sealed_for() -> None:
    mine = SEAL.seal("a", ENGINE)
    assert mine.startswith(ENGINE + "_") and len(mine) == len(ENGINE) + 1 + ids.TAG_CHARS
    assert SEAL.open("a", mine) == ENGINE
    assert SEAL.open("b", mine) is None
    assert SEAL.open("a", SEAL.seal("b", ENGINE)) is None


@pytest.mark.parametrize("forged", [
    ENGINE,                                               # bare: the engine's own id
    ENGINE[:-1] + "0_" + SEAL.seal("a", ENGINE)[-ids.TAG_CHARS:],   # another engine id
    SEAL.seal("a", ENGINE)[:-1] + "x",                    # the tag altered
    SEAL.seal("a", ENGINE) + "x",
    "x" + SEAL.seal("a", ENGINE),
    SEAL.seal("a", ENGINE)[:-ids.TAG_CHARS - 1] + "-" + SEAL.seal("a", ENGINE)[-ids.TAG_CHARS:],
    SEAL.seal("a", ENGINE)[:-2] + "é",                    # not ASCII: refused, no error
    "", "resp_", "_" * 40, "resp_" + "a" * 5000,
])
def test_anything_else_opens_to_nothing(forged: str) -> None:
    assert SEAL.open("a", forged) is None


def test_the_key_comes_from_the_configuration_and_is_never_shown() -> None:
    again = ids.Seal.from_secrets(None, "sk-admin-0123456789")       # another process
    assert again.open("a", SEAL.seal("a", ENGINE)) == ENGINE and again.shared
    dedicated = ids.Seal.from_secrets("response-key", "sk-admin-0123456789")
    assert dedicated.open("a", ids.Seal.from_secrets("response-key", None).seal(
        "a", ENGINE)) == ENGINE
    assert dedicated.open("a", SEAL.seal("a", ENGINE)) is None
    assert repr(SEAL) == repr(dedicated) == "Seal(shared=True)"


def test_without_a_secret_each_process_has_its_own_key() -> None:
    one, two = ids.Seal.from_secrets(None, None), ids.Seal.from_secrets(None, None)
    assert not one.shared and not two.shared
    assert one.open("a", one.seal("a", ENGINE)) == ENGINE
    assert two.open("a", one.seal("a", ENGINE)) is None


def test_only_the_engines_own_id_and_the_opened_previous_are_sealed() -> None:
    previous = "resp_previous000000"
    other = "resp_someone0else000"       # e.g. another tenant's, echoed from metadata
    answer = {"id": ENGINE, "previous_response_id": previous,
              "metadata": {"id": other, "previous_response_id": other},
              "output": [{"id": "msg_1", "content": [{"text": f'"{ENGINE}" {other}'}]}]}
    data = json.dumps(answer).encode()
    assert ids.whole_id(data) == ENGINE
    shown = ids.AnswerIds(SEAL, "a", (previous, SEAL.seal("a", previous)))
    shown.learn(ENGINE)
    out = json.loads(shown.rewrite(data))
    assert out["id"] == SEAL.seal("a", ENGINE)
    assert out["previous_response_id"] == SEAL.seal("a", previous)
    assert out["metadata"] == {"id": other, "previous_response_id": other}
    assert out["output"] == answer["output"]         # text is text, even quoting the id


def test_a_whole_answers_id_is_its_top_level_one() -> None:
    nested_first = json.dumps({"metadata": {"id": "resp_chosen0by0client"},
                               "id": ENGINE}).encode()
    assert ids.whole_id(nested_first) == ENGINE
    assert ids.whole_id(b'{"metadata": {"id": "resp_chosen0by0client"}}') is None
    assert ids.whole_id(b"not json") is None


def _event(kind: str, payload: dict[str, object]) -> bytes:
    return (f"event: {kind}\n".encode() + b"data: "
            + json.dumps({**payload, "type": kind}).encode() + b"\n\n")


def test_a_streams_id_is_found_and_sealed_even_when_cut_across_chunks() -> None:
    stream = (_event("response.created", {"response": {"id": ENGINE, "metadata": None}})
              + _event("response.output_text.delta",
                       {"delta": json.dumps({"response": {"id": "resp_x0"}})})
              + _event("response.completed", {"response": {"id": ENGINE}}))
    for size in (1, 7, 64, len(stream)):
        lines, shown, out = ids.WholeLines(), ids.AnswerIds(SEAL, "a", None), b""
        for i in range(0, len(stream), size):
            got = lines.feed(stream[i:i + size])
            if shown.engine_id is None:
                found = ids.stream_id(got)
                if found is not None:
                    shown.learn(found)
            out += shown.rewrite(got)
        out += shown.rewrite(lines.rest())
        assert out == stream.replace(ENGINE.encode(), SEAL.seal("a", ENGINE).encode())


def test_a_delta_that_looks_like_a_response_is_not_one() -> None:
    fake = _event("response.output_text.delta",
                  {"delta": '{"response": {"id": "resp_x0"}}'})
    assert ids.stream_id(fake) is None


def test_the_engine_never_gets_a_request_id_and_gets_its_own_previous_id() -> None:
    body = {"model": "m", "input": "hi", "request_id": ENGINE,
            "previous_response_id": SEAL.seal("a", ENGINE)}
    assert ids.engine_body(body, ENGINE) == {"model": "m", "input": "hi",
                                              "previous_response_id": ENGINE}
    assert ids.engine_body({"model": "m", "request_id": "x"}, None) == {"model": "m"}


def test_the_refusal_names_only_what_was_sent() -> None:
    err = ids.not_found("resp_nope")
    assert err.http_status == 404
    assert err.envelope()["error"] == {
        "message": "Previous response with id 'resp_nope' not found.",
        "type": "invalid_request_error", "param": "previous_response_id",
        "code": "previous_response_not_found"}


def test_a_short_admin_key_is_never_what_the_ids_key_comes_from() -> None:
    """Every id a tenant sees is a sample to guess the key's secret from offline: an
    admin key too short to resist that (it opens the Admin API) is not used."""
    short = ids.Seal.from_secrets(None, "admin")
    assert not short.shared and short.weak_admin_key
    assert ids.Seal.from_secrets(None, "admin").open("a", short.seal("a", ENGINE)) is None
    assert not SEAL.weak_admin_key and SEAL.shared


def test_the_key_is_stretched_not_a_plain_hmac_of_the_secret() -> None:
    plain = hmac.new(b"sk-admin-0123456789", b"synapse/responses-id/v2",
                     hashlib.sha256).digest()
    assert ids.stretched("sk-admin-0123456789") != plain
    assert len(ids.stretched("sk-admin-0123456789")) == 32
