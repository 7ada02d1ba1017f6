"""The official anthropic client as the judge of what the translators produce: an answer
is handed to the client through its transport (httpx2's MockTransport stands in for the
network), and the client's own parser — strict response validation on — reads it."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx2
import orjson
from anthropic.types import Message

DATA = pathlib.Path(__file__).parent / "data" / "vllm-0.32"
ASK: dict[str, Any] = {"model": "smollm2", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Say hello."}]}

Handler = Callable[[dict[str, Any]], httpx2.Response]


def data(name: str) -> bytes:
    return (DATA / name).read_bytes()


def pieces(raw: bytes, size: int) -> Iterator[bytes]:
    """``raw`` cut every ``size`` bytes: the translator must not care where."""
    for i in range(0, len(raw), size):
        yield raw[i:i + size]


def client(handler: Handler) -> anthropic.Anthropic:
    """A client whose requests ``handler`` answers (it gets the JSON body sent)."""
    def transport(request: httpx2.Request) -> httpx2.Response:
        return handler(orjson.loads(request.content))

    return anthropic.Anthropic(api_key="k", base_url="http://cp.test", max_retries=0,
                               _strict_response_validation=True,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(
                                   transport)))


def sse_response(body: bytes | Iterator[bytes]) -> httpx2.Response:
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)


def final_message(stream_bytes: bytes | Iterator[bytes], **ask: Any) -> Message:
    """The Message the SDK's stream helper accumulates from an event stream."""
    with client(lambda _body: sse_response(stream_bytes)) as c, c.messages.stream(
            **{**ASK, **ask}) as stream:
        return stream.get_final_message()


def event_types(stream_bytes: bytes) -> list[str]:
    """The type of each raw event, as the SDK yields them (``ping`` included)."""
    with client(lambda _body: sse_response(stream_bytes)) as c:
        return [e.type for e in c.messages.create(**ASK, stream=True)]


def parsed_message(message: dict[str, Any]) -> Message:
    """A whole Message body, read by the SDK with strict validation."""
    with client(lambda _body: httpx2.Response(200, json=message)) as c:
        return c.messages.create(**ASK)
