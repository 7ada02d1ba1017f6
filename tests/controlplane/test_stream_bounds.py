"""Stream buffers are bounded and scanned once: an event that never ends (a broken or
hostile engine) is given up at ``stream_usage.HELD_MAX`` instead of being held and
rescanned on every read, and an assembled answer past ``sse.ASSEMBLED_MAX`` is not
cached. Work is counted (bytes searched), never timed."""

from __future__ import annotations

import orjson

from controlplane.core import model_rename, sse, stream_usage
from tests.controlplane.test_sse import stream_bytes

HELD_MAX = stream_usage.HELD_MAX
READ = 4096


def _reads(total: int, piece: bytes = b"x" * 4095 + b"\r") -> list[bytes]:
    return [piece] * (total // len(piece))


def test_parser_gives_up_an_event_that_never_ends() -> None:
    parser = sse.SSEParser()
    out = [e for r in _reads(3 * HELD_MAX, b"data: " + b"x" * 4090) for e in parser.feed(r)]
    assert out == [] and parser.failed
    assert parser.held <= HELD_MAX
    # a failed parser reports no later event: the assembler never sees [DONE]
    asm = sse.assemble(parser.feed(stream_bytes()))
    assert not asm.complete


def test_parser_scans_each_byte_a_bounded_number_of_times() -> None:
    parser = sse.SSEParser()
    reads = _reads(HELD_MAX // 2)       # CRs in the data, no event end
    for r in reads:
        assert parser.feed(r) == []
    fed = sum(map(len, reads))
    assert not parser.failed and parser.held == fed
    assert parser.scanned <= fed + 4 * len(reads)


def test_parser_output_is_unchanged_for_normal_streams() -> None:
    raw = stream_bytes()
    want = sse.SSEParser().feed(raw)
    for body in (raw, raw.replace(b"\n\n", b"\r\n\r\n")):
        for size in (1, 2, 3, 5, 64):
            parser = sse.SSEParser()
            got = [e for i in range(0, len(body), size) for e in parser.feed(body[i:i + size])]
            assert got == want and not parser.failed


def _renamed_stream() -> bytes:
    return (b'data: {"model":"up","x":1}\n\n' b'data: {"model":"up","x":2}\r\n\r\n'
            b"data: [DONE]\n\n")


def test_renamer_passes_an_event_that_never_ends_through() -> None:
    renamer = model_rename.StreamRenamer("client")
    long_event = b'data: {"model":"up","pad":"' + b"y" * (2 * HELD_MAX) + b'"}'
    reads = [long_event[i:i + READ] for i in range(0, len(long_event), READ)]
    tail = b"\n\n" + _renamed_stream()
    out = b"".join(renamer.feed(r) for r in reads)
    assert renamer.held <= HELD_MAX
    assert out == long_event[:len(out)] and len(out) >= len(long_event) - HELD_MAX
    # the end of that event passes unrenamed, the next events are renamed again
    out += renamer.feed(tail[:1]) + renamer.feed(tail[1:]) + renamer.rest()
    assert out.startswith(long_event + b"\n\n")
    rest = out[len(long_event) + 2:]
    assert rest == (b'data: {"model":"client","x":1}\n\n'
                    b'data: {"model":"client","x":2}\r\n\r\n' b"data: [DONE]\n\n")


def test_renamer_scans_each_byte_a_bounded_number_of_times() -> None:
    renamer = model_rename.StreamRenamer("client")
    reads = _reads(HELD_MAX // 2)
    for r in reads:
        assert renamer.feed(r) == b""
    fed = sum(map(len, reads))
    assert renamer.held == fed
    assert renamer.scanned <= fed + 4 * len(reads)


def test_renamer_output_is_unchanged_for_normal_streams() -> None:
    body = _renamed_stream()
    want = model_rename.StreamRenamer("client").feed(body)
    for size in (1, 2, 3, 5, 64):
        r = model_rename.StreamRenamer("client")
        got = b"".join(r.feed(body[i:i + size]) for i in range(0, len(body), size))
        assert got + r.rest() == want


def test_assembler_stops_past_its_cap() -> None:
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "z" * 65536},
                          "finish_reason": None}]}
    data = orjson.dumps(chunk).decode()
    asm = sse.StreamAssembler()
    for _ in range(sse.ASSEMBLED_MAX // len(data) + 2):
        asm.add_data(data)
    end = dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
    asm.add_data(orjson.dumps(end).decode())
    asm.add_data(sse.DONE)
    assert asm.error is not None and not asm.complete
    assert asm.assembled <= sse.ASSEMBLED_MAX
