"""The engine's usage read from an answer's last bytes, under every API's names: what the
token limits settle on and the access log reports for Responses and Messages too."""

from __future__ import annotations

from controlplane.core import usage


def test_responses_usage_counts_cached_tokens_inside_the_input() -> None:
    tail = (b'"status":"completed","usage":{"input_tokens":120,"input_tokens_details":'
            b'{"cached_tokens":64},"output_tokens":9,"total_tokens":129},"user":null}}')
    assert usage.from_tail(tail) == usage.Usage(120, 9, 64)


def test_anthropic_usage_counts_the_cached_prompt_apart() -> None:
    tail = (b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":'
            b'20,"cache_read_input_tokens":96,"cache_creation_input_tokens":4,'
            b'"output_tokens":7}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert usage.from_tail(tail) == usage.Usage(120, 7, 96)


def test_answers_without_token_counts_have_no_usage() -> None:
    assert usage.from_tail(b'{"text":"hi","usage":{"type":"duration","seconds":3}}') is None
    assert usage.from_tail(b'{"usage":{"output_tokens":3}}') is None


def test_a_usage_word_the_client_makes_the_engine_echo_after_the_usage_is_not_taken_for_it(
) -> None:
    # vLLM's field order: usage, then prompt_logprobs (asked by the client), whose decoded
    # tokens are the prompt's own words; and a legacy top_logprobs map keyed by them
    answer = (b'{"id":"c","choices":[{"index":0,"message":{"content":"x"}}],'
              b'"usage":{"prompt_tokens":12,"total_tokens":5012,"completion_tokens":5000,'
              b'"prompt_tokens_details":{"cached_tokens":4}},"prompt_logprobs":[null,'
              b'{"318":{"logprob":-1.5,"rank":1,"decoded_token":"usage"}},'
              b'{"prompt_tokens":0.0,"usage":-0.1,"completion_tokens":1}]}')
    assert usage.from_tail(answer) == usage.Usage(12, 5000, 4)
    assert usage.from_tail(b'{"choices":[],"prompt_logprobs":[{"1":{"decoded_token":'
                           b'"usage"}}]}') is None


def _answer(prompt: bytes, completion: bytes = b"2") -> bytes:
    return (b'{"id":"x","choices":[{"index":0,"message":{"content":"hi"}}],"usage":'
            b'{"prompt_tokens":' + prompt + b',"completion_tokens":' + completion
            + b',"total_tokens":5,"prompt_tokens_details":{"cached_tokens":1}}}')


def test_a_count_above_the_cap_is_no_usage_so_the_request_is_estimated() -> None:
    # A hostile engine's 10**30 (or 2**63) made every later usage flush fail for all
    # tenants (SQLite and protobuf refuse integers past int64): the usage is taken as
    # absent instead, and the request is accounted from the control plane's estimate.
    assert usage.from_tail(_answer(b"3")) == usage.Usage(3, 2, 1)
    limit = str(usage.MAX_COUNT).encode()
    assert usage.from_tail(_answer(limit, limit)) == usage.Usage(
        usage.MAX_COUNT, usage.MAX_COUNT, 1)
    for big in (str(usage.MAX_COUNT + 1).encode(), str(2**63).encode(), b"1" + b"0" * 30):
        assert usage.from_tail(_answer(big)) is None
        assert usage.from_tail(_answer(b"3", big)) is None
    tail = (b'"usage":{"input_tokens":20,"cache_read_input_tokens":' + str(2**63).encode()
            + b',"output_tokens":7}}')
    assert usage.from_tail(tail) is None


def test_a_count_of_thousands_of_digits_is_no_usage_and_raises_nothing() -> None:
    # Python refuses to make an int of more than 4300 digits (ValueError: a 500 to the
    # tenant): the length is checked before any int is built.
    digits = b"9" * 5000
    assert usage.from_tail(_answer(digits, digits)) is None
    assert usage.from_tail(_answer(b"3", digits)) is None
    assert usage.from_tail(_answer(b"0" * 5000 + b"3")) == usage.Usage(3, 2, 1)


def test_a_negative_or_fractional_count_is_no_usage_whichever_count_it_is() -> None:
    # As a negative prompt count already was: any count out of 0..MAX_COUNT (or not a
    # whole number) makes the engine's usage untrustworthy as a whole.
    for bad in (b"-5", b"2.5", b"1e+18", b"NaN", b"Infinity", b'"lots"', b"[1]", b"true"):
        assert usage.from_tail(_answer(bad)) is None, bad
        assert usage.from_tail(_answer(b"3", bad)) is None, bad
    # JSON does not tell 3 from 3.0, and a count the engine does not know may be null
    assert usage.from_tail(_answer(b"3.0", b"2.00")) == usage.Usage(3, 2, 1)
    assert usage.from_tail(_answer(b"3", b"null")) == usage.Usage(3, 0, 1)
    assert usage.from_tail(b'"usage":{"input_tokens":20,"cache_read_input_tokens":null,'
                           b'"output_tokens":7}}') == usage.Usage(20, 7, None)
