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
