"""vLLM mode HTTP handlers: OpenAI chat / completions, models, health, version, metrics.

Response shapes follow vLLM's OpenAI server (``chatcmpl-…`` / ``cmpl-…`` ids,
``stop_reason``, ``prompt_logprobs``), with ``system_fingerprint: "synapse-simulator"``
and ``owned_by: "synapse-simulator"`` so nobody mistakes the output for a model's.
``usage.prompt_tokens_details.cached_tokens`` reports the prompt tokens taken from the
prefix cache (vLLM's ``--enable-prompt-tokens-details``).

Streaming is SSE as vLLM sends it: per choice a first chunk with the role (chat), one
chunk per generated token, a final chunk with ``finish_reason``; then, with
``stream_options.include_usage``, a chunk with empty ``choices`` and the usage; then
``data: [DONE]``. A client that disconnects aborts its sequences
(``vllm:request_success_total{finished_reason="abort"}``).

Requests are cut into scheduler sequences here: one per (prompt, choice); all choices of
one prompt share its tokens and block hashes, so the later ones hit the prefix cache.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import orjson
from aiohttp import web

from simulator import chat_tokens, errors, faults, protocol, textgen, toolcalls
from simulator import engine as sim_engine
from simulator import metrics as sim_metrics
from simulator import scheduler as sched
from simulator import tasks as sim_tasks
from simulator.config import SimulatorSettings
from synapse_common import clock as clocks
from synapse_common import tokens

FINGERPRINT = "synapse-simulator"
VLLM_VERSION = "0.32.0"  # the shapes imitated are those of the engine tier's vLLM
JSON = "application/json"
# Work above these sizes moves to a thread (about 5 ms of CPU either way).
THREAD_ABOVE_TOKENS = 20_000  # output tokens to pre-generate
THREAD_ABOVE_CHARS = 64_000  # prompt characters to tokenize


class Choice:
    """One sequence plus the text (or the tool call's arguments) it will produce."""

    __slots__ = ("call", "index", "out", "seq")

    def __init__(self, index: int, seq: sched.Seq, out: textgen.Output,
                 call: toolcalls.Call | None = None) -> None:
        self.index = index
        self.seq = seq
        self.out = out
        self.call = call

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.call is not None else self.out.finish_reason


class VllmApi:
    def __init__(self, settings: SimulatorSettings, engine: sim_engine.Engine,
                 metrics: sim_metrics.VllmMetrics, fault_state: faults.Faults,
                 wall: Callable[[], float], max_model_len: int) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.faults = fault_state
        self.wall = wall
        self.max_model_len = max_model_len
        self.served = settings.served_model_names or [settings.model]
        self.block_size = settings.profile.block_size
        self.started = int(wall())
        self.chat_tokens = chat_tokens.ChatTokenizer()

    def routes(self) -> list[web.RouteDef]:
        generate = [web.post("/v1/chat/completions", self.chat),
                    web.post("/v1/completions", self.completions)]
        return [
            *(generate if sim_tasks.GENERATE in self.settings.tasks else []),
            web.get("/v1/models", self.models),
            web.get("/version", self.version),
            web.get("/metrics", self.metrics_text),
            web.get("/sim/state", self.state),
        ]

    # -- small endpoints ----------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data: list[dict[str, Any]] = [{"id": name, "object": "model", "created": self.started,
                 "owned_by": FINGERPRINT, "root": self.settings.model, "parent": None,
                 "max_model_len": self.max_model_len, "permission": [],
                 "tasks": self.settings.tasks}
                for name in self.served]
        return _json({"object": "list", "data": data})

    async def state(self, request: web.Request) -> web.Response:
        return _json(self.engine.scheduler.state())

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": VLLM_VERSION, "simulator": FINGERPRINT, "simulated": True,
                      "tasks": self.settings.tasks})

    async def metrics_text(self, request: web.Request) -> web.Response:
        # Rendering is a few hundred microseconds of pure Python: not worth a thread hop.
        return web.Response(body=self.metrics.render(), headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -- generation ---------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        gen = protocol.parse(protocol.parse_body(await request.read()), chat=True)
        return await self._generate(request, gen)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        gen = protocol.parse(protocol.parse_body(await request.read()), chat=False)
        return await self._generate(request, gen)

    def _model_name(self, gen: protocol.GenRequest) -> str:
        return protocol.served_model(gen.model, self.served)

    def _choices(self, gen: protocol.GenRequest, request_id: str) -> tuple[list[Choice], int]:
        choices: list[Choice] = []
        prompt_tokens = 0
        seed = self.settings.seed if gen.seed is None else gen.seed
        for p, prompt in enumerate(gen.prompts):
            if gen.messages is not None:
                ids = self.chat_tokens.chat(gen.messages)
            else:
                ids = tokens.tokenize(prompt)
            if not ids:
                # As vLLM: a sequence with no tokens cannot be scheduled (it crashed the
                # engine loop, taking the process down for every client).
                raise errors.BadRequest("The prompt cannot be empty.", param="prompt")
            error = protocol.context_error(self.max_model_len, len(ids), gen.max_tokens, gen.chat)
            if error is not None:
                raise error
            prompt_tokens += len(ids)
            hashes = tokens.block_hashes(ids, self.block_size, tokens.salt_seed(gen.cache_salt))
            max_tokens = gen.max_tokens or min(self.settings.profile.default_max_tokens,
                                               self.max_model_len - len(ids))
            call = toolcalls.choose(gen.tools, gen.tool_choice, gen.last_user, seed)
            for i in range(gen.n):
                if call is not None:
                    out = textgen.Output(toolcalls.pieces(call.arguments), "stop", None)
                else:
                    out = textgen.generate(prompt, seed, i, max_tokens,
                                           ignore_eos=gen.ignore_eos, stop=gen.stop)
                seq = sched.Seq(request_id, len(ids), hashes, out.num_tokens, out.finish_reason)
                choices.append(Choice(p * gen.n + i, seq, out, call))
        return choices, prompt_tokens

    async def _generate(self, request: web.Request,
                        gen: protocol.GenRequest) -> web.StreamResponse:
        model = self._model_name(gen)
        # vLLM takes the base of its ids from an X-Request-Id header when there is one.
        base = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        request_id = ("chatcmpl-" if gen.chat else "cmpl-") + base
        if (gen.n * (gen.max_tokens or 0) > THREAD_ABOVE_TOKENS
                or sum(len(p) for p in gen.prompts) > THREAD_ABOVE_CHARS):
            # Tokenizing a book or pre-generating a huge ignore_eos answer would hold the
            # event loop (and every other request) for a noticeable time.
            choices, prompt_tokens = await asyncio.to_thread(self._choices, gen, request_id)
        else:
            choices, prompt_tokens = self._choices(gen, request_id)
        handle = self.engine.submit([c.seq for c in choices], gen.stream)
        try:
            stall_after = self.faults.settings.stall_after_chunks
            if not gen.stream and stall_after is not None:
                await drop_after_stall(request, self.faults.settings.stall_s,
                                       self.faults.time.sleep)
            if gen.stream:
                return await self._stream(request, gen, model, request_id, choices,
                                          prompt_tokens, handle)
            while not handle.done:
                await handle.wait()
            if handle.aborted:
                drop(request)  # shut down mid-request: no answer rather than a false one
        finally:
            self.engine.abort(handle)  # no-op for finished sequences
        body = self._full_body(gen, model, request_id, choices, prompt_tokens)
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    def _usage(self, choices: list[Choice], prompt_tokens: int, n: int) -> dict[str, Any]:
        completion = sum(c.out.num_tokens for c in choices)
        cached = sum(c.seq.num_cached_tokens for c in choices[::n])
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion,
                "completion_tokens": completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _full_body(self, gen: protocol.GenRequest, model: str, request_id: str,
                   choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        out = []
        for c in choices:
            entry: dict[str, Any] = {"index": c.index, "logprobs": None,
                                     "finish_reason": c.finish_reason,
                                     "stop_reason": c.out.stop_reason}
            if gen.chat:
                calls = [] if c.call is None else [{
                    "id": c.call.id, "type": "function",
                    "function": {"name": c.call.name, "arguments": c.call.arguments}}]
                entry["message"] = {"role": "assistant",
                                    "content": None if c.call else c.out.text,
                                    "tool_calls": calls, "reasoning_content": None}
            else:
                entry["text"] = c.out.text
                entry["prompt_logprobs"] = None
            out.append(entry)
        body = {"id": request_id, "object": "chat.completion" if gen.chat else "text_completion",
                "created": int(self.wall()), "model": model, "choices": out,
                "usage": self._usage(choices, prompt_tokens, gen.n),
                "system_fingerprint": FINGERPRINT, "prompt_logprobs": None}
        if self.settings.answer_origin:
            body["origin"] = request_id
        return body

    async def _stream(self, request: web.Request, gen: protocol.GenRequest, model: str,
                      request_id: str, choices: list[Choice], prompt_tokens: int,
                      handle: sim_engine.Handle) -> web.StreamResponse:
        writer = SseWriter(request, gen, model, request_id, int(self.wall()), self.faults)
        await writer.open()
        if gen.chat:
            for c in choices:
                await writer.chunk(c.index, {"role": "assistant", "content": ""}, None, None)
        emitted = [0] * len(choices)
        closed = [False] * len(choices)
        while not all(closed):
            await handle.wait()
            for k, c in enumerate(choices):
                if closed[k]:
                    continue
                upto = c.seq.num_generated
                while emitted[k] < upto:
                    if c.call is None:
                        await writer.token(c.index, c.out.pieces[emitted[k]])
                    else:
                        await writer.call_piece(c.index, c.call, c.out.pieces[emitted[k]],
                                                first=emitted[k] == 0)
                    emitted[k] += 1
                if c.seq.state is sched.State.FINISHED:
                    if c.seq.finish_reason == "abort":
                        drop(request)
                    await writer.chunk(c.index, {} if gen.chat else "", c.finish_reason,
                                       c.out.stop_reason)
                    closed[k] = True
        if gen.include_usage:
            await writer.usage(self._usage(choices, prompt_tokens, gen.n))
        return await writer.close()


class StreamDropped(Exception):
    """The stall fault dropped the connection; the handler must not answer further."""


def drop(request: web.Request) -> NoReturn:
    """Close the connection without (the rest of) an answer."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    raise StreamDropped


async def drop_after_stall(request: web.Request, stall_s: float,
                           sleep: clocks.Sleep) -> None:
    """The stall fault: stay silent, then drop the connection without an answer."""
    await sleep(stall_s)
    drop(request)


class EventWriter:
    """An SSE stream that applies the stall fault by counting events: named events
    (Responses, Messages) through :meth:`send`; vLLM's bare ``data:`` chunks through
    :class:`SseWriter`."""

    def __init__(self, request: web.Request, faults_: faults.Faults) -> None:
        self.request = request
        # the stall fault as it is when the stream begins
        self.stall_after = faults_.settings.stall_after_chunks
        self.stall_s = faults_.settings.stall_s
        self._sleep = faults_.time.sleep
        self.events = 0
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def write(self, frame: bytes) -> None:
        if self.stall_after is not None and self.events >= self.stall_after:
            await drop_after_stall(self.request, self.stall_s, self._sleep)
        await self.response.write(frame)
        self.events += 1

    async def send(self, name: str, payload: Mapping[str, Any]) -> None:
        await self.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload)
                         + b"\n\n")

    async def close(self) -> web.StreamResponse:
        await self.response.write_eof()
        return self.response


class SseWriter(EventWriter):
    """Writes vLLM-shaped SSE chunks."""

    def __init__(self, request: web.Request, gen: protocol.GenRequest, model: str,
                 request_id: str, created: int, faults_: faults.Faults) -> None:
        super().__init__(request, faults_)
        self.chat = gen.chat
        self.head = {"id": request_id,
                     "object": "chat.completion.chunk" if gen.chat else "text_completion",
                     "created": created, "model": model}

    async def _event(self, payload: dict[str, Any]) -> None:
        await self.write(b"data: " + orjson.dumps(payload) + b"\n\n")

    async def chunk(self, index: int, delta: Any, finish_reason: str | None,
                    stop_reason: str | None) -> None:
        choice: dict[str, Any] = {"index": index, "logprobs": None,
                                  "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        await self._event({**self.head, "choices": [choice]})

    async def token(self, index: int, piece: str) -> None:
        await self.chunk(index, {"content": piece} if self.chat else piece, None, None)

    async def call_piece(self, index: int, call: toolcalls.Call, piece: str,
                         first: bool) -> None:
        """A tool call as vLLM streams it: a chunk with the id and name, then one per
        piece of the arguments."""
        if first:
            await self.chunk(index, {"content": None, "tool_calls": [{
                "id": call.id, "type": "function", "index": 0,
                "function": {"name": call.name}}]}, None, None)
        await self.chunk(index, {"content": None, "tool_calls": [{
            "index": 0, "function": {"arguments": piece}}]}, None, None)

    async def usage(self, usage: dict[str, Any]) -> None:
        await self._event({**self.head, "choices": [], "usage": usage})

    async def close(self) -> web.StreamResponse:
        await self.response.write(b"data: [DONE]\n\n")
        return await super().close()


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=JSON)
