"""Streams whose client did not ask for usage: the engine is asked, the client never sees it."""

from __future__ import annotations

import json

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


BOTH = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
NULL_USAGE = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "y"}}],
                    "usage": None})


@given(st.lists(st.sampled_from([CONTENT, FINISH, USAGE, DONE, BOTH, NULL_USAGE]),
                max_size=12),
       st.lists(st.integers(1, 400), min_size=1, max_size=8))
def test_the_stripper_gives_each_complete_event_filtered_whatever_the_reads(
        events: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(events)
    pieces, i = [], 0
    while i < len(stream):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(stream[i:i + size])
        i += size
    whole = stream.split(b"\n\n")
    expected = b"".join(kept + b"\n\n" for e in whole[:-1]
                        if (kept := stream_usage._filtered(e)) is not None) + whole[-1]
    assert strip_all(pieces) == expected


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
