"""Streams whose client did not ask for usage: the engine is asked, the client never sees it."""

from __future__ import annotations

import json
import pathlib

import orjson
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import sse, stream_usage


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CONTENT = event({"id": "c", "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]})
FINISH = event({"id": "c", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = event({"id": "c", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
DONE = b"data: [DONE]\n\n"


def strip_all(pieces: list[bytes]) -> bytes:
    s = stream_usage.UsageStripper()
    return b"".join(s.feed(p) for p in pieces) + s.rest()


def test_upstream_body_asks_for_usage_and_keeps_other_options() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": False}}
    assert stream_usage.needs_usage(body)
    sent = orjson.loads(stream_usage.upstream_body(body))
    assert sent["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert not stream_usage.needs_usage(sent)
    assert not stream_usage.needs_usage({"model": "m"})     # not a stream


def test_the_usage_chunk_is_removed_wherever_the_reads_split_it() -> None:
    whole = CONTENT + FINISH + USAGE + DONE
    expected = CONTENT + FINISH + DONE
    assert strip_all([whole]) == expected
    for cut in range(1, len(whole)):          # every split of the stream into two reads
        assert strip_all([whole[:cut], whole[cut:]]) == expected
    events = [e for e in sse.SSEParser().feed(strip_all([whole]))]
    assert all("usage" not in e for e in events)


def test_events_without_usage_pass_as_the_same_bytes() -> None:
    s = stream_usage.UsageStripper()
    assert s.feed(CONTENT) is CONTENT


def test_usage_on_a_chunk_with_choices_is_dropped_from_that_chunk_only() -> None:
    both = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    out = strip_all([both, DONE])
    first = orjson.loads(out.split(b"\n\n")[0][6:])
    assert first == {"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}]}
    assert out.endswith(DONE)


def test_delivered_counter_counts_content_deltas_even_split_across_reads() -> None:
    role = event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    text = event({"choices": [{"index": 0, "text": "hi", "finish_reason": None}]})
    reasoning = event({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]})
    tool = event({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "{\"a\""}}]}}]})
    responses = event({"type": "response.output_text.delta", "delta": "hi"})
    stream = role + CONTENT + text + reasoning + tool + responses + FINISH + USAGE + DONE
    for size in (1, 7, len(stream)):
        c = stream_usage.DeliveredCounter()
        for i in range(0, len(stream), size):
            c.feed(stream[i:i + size])
        assert c.count == 5, size       # the role chunk's "" and the rest carry no piece
    partial = stream_usage.DeliveredCounter()
    partial.feed(CONTENT + CONTENT[:-2])    # the second event never completed
    assert partial.count == 1


def test_delivered_counter_counts_a_stream_longer_than_its_batch_in_any_pieces() -> None:
    events = 2 * stream_usage.BATCH_BYTES // len(CONTENT) + 3
    stream = CONTENT * events + FINISH + USAGE + DONE
    for size in (1, 7, 4093, len(stream)):
        c = stream_usage.DeliveredCounter()
        for i in range(0, len(stream), size):
            c.feed(stream[i:i + size])
            assert c._pending_bytes < stream_usage.BATCH_BYTES     # never more held
        assert c.count == events, size
        assert c.count == events        # reading it again counts nothing twice


# vLLM's own bytes (pydantic's compact JSON, its field order): without include_usage the
# fingerprint rides on the finish chunk; with it, on the usage chunk alone.
FP = "vllm-0.32.0-f7bfd0d0"
_HEAD = '"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m"'
V_ROLE = ('data: {' + _HEAD + ',"choices":[{"index":0,"delta":{"role":"assistant",'
          '"content":""},"logprobs":null,"finish_reason":null}]}\n\n').encode()
V_TEXT = ('data: {' + _HEAD + ',"choices":[{"index":0,"delta":{"content":"Yes"},'
          '"logprobs":null,"finish_reason":null}]}\n\n').encode()
_V_END = ',"choices":[{"index":0,"delta":{"content":""},"logprobs":null,' \
         '"finish_reason":"stop","stop_reason":null}]'
V_FINISH = ('data: {' + _HEAD + _V_END + '}\n\n').encode()
V_FINISH_FP = ('data: {' + _HEAD + _V_END + ',"system_fingerprint":"' + FP + '"}\n\n').encode()
V_USAGE = ('data: {' + _HEAD + ',"choices":[],"usage":{"prompt_tokens":31,'
           '"total_tokens":33,"completion_tokens":2},"system_fingerprint":"' + FP
           + '"}\n\n').encode()
_C_HEAD = '"id":"cmpl-1","object":"text_completion","created":1,"model":"m"'
_C_END = ',"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length",' \
         '"stop_reason":null}]'
C_TEXT = ('data: {' + _C_HEAD + ',"choices":[{"index":0,"text":" yes","logprobs":null,'
          '"finish_reason":null,"stop_reason":null}]}\n\n').encode()
C_FINISH = ('data: {' + _C_HEAD + _C_END + '}\n\n').encode()
C_FINISH_FP = ('data: {' + _C_HEAD + _C_END + ',"system_fingerprint":"' + FP
               + '"}\n\n').encode()
C_USAGE = ('data: {' + _C_HEAD + ',"choices":[],"usage":{"prompt_tokens":4,"total_tokens":'
           '7,"completion_tokens":3},"system_fingerprint":"' + FP + '"}\n\n').encode()



BOTH = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
NULL_USAGE = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "y"}}],
                    "usage": None})


FINGERPRINTED = event({"id": "c", "choices": [], "system_fingerprint": "fp",
                      "usage": {"prompt_tokens": 7, "completion_tokens": 2}})


def filtered_events(stream: bytes) -> bytes:
    """What the stripper should make of ``stream``, event by event: each without its
    usage, a dropped usage chunk's fingerprint on the finish chunk just before it."""
    whole = stream.split(b"\n\n")
    out: list[bytes] = []
    after = False
    for e in whole[:-1]:
        kept = stream_usage._filtered(e)
        if kept is not None:
            out.append(kept)
            after = True
            continue
        mark = stream_usage._payload(e).get("system_fingerprint")
        chunk = stream_usage._payload(out[-1]) if after else None
        if isinstance(chunk, dict) and mark is not None:
            finished = any(isinstance(c.get("finish_reason"), str) for c in chunk["choices"])
            if finished and chunk.get("system_fingerprint") is None:
                out[-1] = b"data: " + orjson.dumps({**chunk, "system_fingerprint": mark})
        after = False
    return b"".join(e + b"\n\n" for e in out) + whole[-1]


@given(st.lists(st.sampled_from([CONTENT, FINISH, USAGE, DONE, BOTH, NULL_USAGE,
                                 FINGERPRINTED, V_FINISH, V_FINISH_FP]), max_size=12),
       st.lists(st.integers(1, 400), min_size=1, max_size=8))
def test_the_stripper_gives_each_complete_event_filtered_whatever_the_reads(
        events: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(events)
    pieces, i = [], 0
    while i < len(stream):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(stream[i:i + size])
        i += size
    assert strip_all(pieces) == filtered_events(stream)


def test_a_blank_line_before_the_usage_event_goes_with_it_as_split_cuts_it() -> None:
    # "\n\n\n" is split as SEP then "\n": the odd newline begins the usage event
    assert strip_all([CONTENT + b"\n" + USAGE + DONE]) == CONTENT + DONE
    assert strip_all([CONTENT + b"\n\n" + USAGE + DONE]) == CONTENT + b"\n\n" + DONE


def test_a_crlf_framed_stream_flows_event_by_event_and_loses_its_usage() -> None:
    """An upstream framing events with CRLF (sse-starlette's default) had its whole
    stream held until its end, usage included (probe finding)."""
    crlf = [e.replace(b"\n", b"\r\n") for e in (CONTENT, CONTENT, FINISH, USAGE, DONE)]
    stream = b"".join(crlf)
    s = stream_usage.UsageStripper()
    out, first_at = b"", None
    for i in range(0, len(stream), 5):
        out += s.feed(stream[i:i + 5])
        if first_at is None and out:
            first_at = i + 5
    out += s.rest()
    assert out == CONTENT + CONTENT + FINISH + DONE         # as LF, the usage gone
    assert first_at is not None and first_at <= len(crlf[0]) + 5    # the first at once


def test_a_stream_that_never_ends_an_event_is_passed_on_not_held_without_bound() -> None:
    s = stream_usage.UsageStripper()
    piece = b"data: " + b"x" * 65536
    out = b"".join(s.feed(piece) for _ in range(stream_usage.HELD_MAX // len(piece) + 2))
    assert len(s._held) == 0 or len(s._held) <= stream_usage.HELD_MAX
    assert len(out) > stream_usage.HELD_MAX


def test_the_delivered_counter_reads_a_crlf_framed_stream_too() -> None:
    c = stream_usage.DeliveredCounter()
    for event in (CONTENT, CONTENT, FINISH):
        c.feed(event.replace(b"\n", b"\r\n"))
    assert c.count == 2         # (it found no event end and counted nothing)


def test_the_usage_chunks_fingerprint_lands_on_the_finish_chunk_as_vllm_puts_it() -> None:
    """The client that did not ask for usage got no fingerprint at all: the engine, asked
    for usage on its behalf, put it on the usage chunk that was then dropped (probe
    finding, chat and completions)."""
    for asked, plain in (
            (V_ROLE + V_TEXT + V_FINISH + V_USAGE + DONE, V_ROLE + V_TEXT + V_FINISH_FP + DONE),
            (C_TEXT + C_FINISH + C_USAGE + DONE, C_TEXT + C_FINISH_FP + DONE)):
        assert strip_all([asked]) == plain      # byte for byte what vLLM sends unasked
        for cut in range(1, len(asked)):
            assert strip_all([asked[:cut], asked[cut:]]) == plain, cut
        assert strip_all([asked[i:i + 7] for i in range(0, len(asked), 7)]) == plain


def test_only_the_finish_chunk_waits_and_only_for_the_event_after_it() -> None:
    s = stream_usage.UsageStripper()
    assert s.feed(V_ROLE) is V_ROLE and s.feed(V_TEXT) is V_TEXT     # at once, as they came
    assert s.feed(V_FINISH) == b""
    assert s.feed(V_USAGE) == V_FINISH_FP
    assert s.feed(DONE) is DONE and s.rest() == b""
    s = stream_usage.UsageStripper()        # the engine sent no usage chunk: no fingerprint
    assert s.feed(V_FINISH) == b"" and s.feed(DONE) == V_FINISH + DONE


def test_a_finish_chunk_followed_by_another_choice_goes_on_as_it_came() -> None:
    """n > 1: a choice that finished first is released with the next event, unstamped;
    the last finish chunk takes the fingerprint."""
    other = V_TEXT.replace(b'"index":0', b'"index":1')
    last = V_FINISH.replace(b'"index":0', b'"index":1')
    s = stream_usage.UsageStripper()
    out = [s.feed(e) for e in (V_FINISH, other, last, V_USAGE, DONE)]
    assert out == [b"", V_FINISH + other, b"", V_FINISH_FP.replace(b'"index":0', b'"index":1'),
                   DONE]


def test_a_stream_ending_after_its_finish_chunk_still_sends_it() -> None:
    s = stream_usage.UsageStripper()
    assert s.feed(V_TEXT + V_FINISH + DONE[:5]) == V_TEXT
    assert s.pending() == V_FINISH and s.pending() == b""       # before an error event
    assert s.rest() == DONE[:5]
    s = stream_usage.UsageStripper()
    assert s.feed(V_FINISH) == b"" and s.rest() == V_FINISH


def test_a_finish_chunk_with_its_own_fingerprint_or_usage_is_kept_as_the_engine_sent_it(
        ) -> None:
    own = V_FINISH_FP.replace(FP.encode(), b"other")
    assert strip_all([own, V_USAGE, DONE]) == own + DONE
    continuous = V_FINISH.replace(b'"stop_reason":null}]', b'"stop_reason":null}],'
                                  b'"usage":{"prompt_tokens":1,"completion_tokens":2}')
    assert strip_all([continuous, V_USAGE, DONE]) == V_FINISH_FP + DONE
    spaced = event({"id": "c", "choices": [{"index": 0, "finish_reason": "stop"}]})
    assert b'"finish_reason": "stop"' in spaced
    got = orjson.loads(strip_all([spaced, V_USAGE])[6:])
    assert got["system_fingerprint"] == FP
    quoted = event({"choices": [{"index": 0, "delta": {"content": '"finish_reason": "x"'},
                                 "finish_reason": None}]})
    s = stream_usage.UsageStripper()
    assert s.feed(quoted) is quoted         # a key's name inside a string is no key


VLLM = pathlib.Path(__file__).parent / "data" / "vllm-0.32"


def test_real_vllm_streams_asked_for_usage_reach_the_client_in_their_unasked_form() -> None:
    """Recorded vLLM streams with include_usage: the fingerprint only on the usage chunk.
    Unasked, vLLM's stream generators stamp it on the finish chunk, after ``choices``."""
    for name in ("chat_natural_stream.sse", "chat_stop_stream.sse", "chat_stream_usage.sse",
                 "chat_tool_stream.sse"):
        recorded = (VLLM / name).read_bytes()
        events = recorded.split(b"\n\n")[:-1]
        usage, fingerprint = events[-2], orjson.loads(events[-2][6:])["system_fingerprint"]
        assert b'"choices":[]' in usage and fingerprint.startswith("vllm-0.32.0-")
        finish = events[-3]
        assert b'"finish_reason":"' in finish and b"system_fingerprint" not in finish
        stamped = finish[:-1] + b',"system_fingerprint":"' + fingerprint.encode() + b'"}'
        unasked = recorded.replace(usage + b"\n\n", b"").replace(finish, stamped)
        assert strip_all([recorded]) == unasked, name
        s = stream_usage.UsageStripper()
        out = [s.feed(e + b"\n\n") for e in events]      # one event a read
        assert all(o == e + b"\n\n" for o, e in zip(out[:-3], events[:-3], strict=True))
        assert out[-3:] == [b"", stamped + b"\n\n", b"data: [DONE]\n\n"], name
