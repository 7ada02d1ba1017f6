"""One answer (a single choice) on the shared engine, for the Responses and Messages APIs.

Chat and completions (``vllm_api``) cut a request into many choices; Responses and
Messages always ask for one, and only differ in how they render it. This module does the
common part: tokenize the chat prompt, check the context length, decide text or tool
call, submit the sequence to the engine, then hand out the pieces as the engine
generates them (:meth:`Answer.stream`) or once it is done (:meth:`Answer.wait`).

Streams that use named events (``event: NAME``) write through :class:`EventWriter`,
which applies the stall fault the same way the chat stream does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from simulator import chat_tokens, errors, protocol, textgen, toolcalls, vllm_api
from simulator import engine as sim_engine
from simulator import scheduler as sched
from simulator.config import SimulatorSettings
from synapse_common import tokens

THREAD_ABOVE_CHARS = vllm_api.THREAD_ABOVE_CHARS


@dataclasses.dataclass
class Ask:
    """What one answer needs, whichever API asked."""

    messages: list[dict[str, Any]]  # chat messages, content as plain text
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    tools: list[toolcalls.Tool]
    tool_choice: str
    ignore_eos: bool = False
    where: str = "messages"  # names the field in an empty-prompt error
    cache_salt: str | None = None  # partitions the prefix cache, as vLLM's


@dataclasses.dataclass
class Answer:
    prompt_tokens: int
    out: textgen.Output  # the text, or the call's argument text in pieces
    call: toolcalls.Call | None
    seq: sched.Seq
    handle: sim_engine.Handle | None = None

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.call is not None else self.out.finish_reason

    @property
    def cached_tokens(self) -> int:
        return self.seq.num_cached_tokens

    async def wait(self, request: web.Request) -> None:
        assert self.handle is not None
        while not self.handle.done:
            await self.handle.wait()
        if self.handle.aborted:
            vllm_api.drop(request)

    async def stream(self, request: web.Request) -> AsyncIterator[str]:
        """Each piece as the engine generates it; the connection drops on an abort."""
        assert self.handle is not None
        emitted = 0
        while True:
            await self.handle.wait()
            while emitted < self.seq.num_generated:
                yield self.out.pieces[emitted]
                emitted += 1
            if self.seq.state is sched.State.FINISHED:
                if self.seq.finish_reason == "abort":
                    vllm_api.drop(request)
                return


class Answers:
    def __init__(self, settings: SimulatorSettings, engine: sim_engine.Engine,
                 max_model_len: int) -> None:
        self.settings = settings
        self.engine = engine
        self.max_model_len = max_model_len
        self.chat_tokens = chat_tokens.ChatTokenizer()

    def prepare(self, ask: Ask, request_id: str) -> Answer:
        ids = self.chat_tokens.chat(ask.messages)
        error = protocol.context_error(self.max_model_len, len(ids), ask.max_tokens, True)
        if error is not None:
            raise error
        seed = self.settings.seed if ask.seed is None else ask.seed
        last_user = next((m["content"] for m in reversed(ask.messages)
                          if m.get("role") == "user"), "")
        call = toolcalls.choose(ask.tools, ask.tool_choice, str(last_user), seed)
        max_tokens = ask.max_tokens or min(self.settings.profile.default_max_tokens,
                                           self.max_model_len - len(ids))
        if call is not None:
            out = textgen.Output(toolcalls.pieces(call.arguments), "stop", None)
        else:
            out = textgen.generate(tokens.render_chat(ask.messages), seed, 0, max_tokens,
                                   ignore_eos=ask.ignore_eos, stop=ask.stop)
        seq = sched.Seq(request_id, len(ids), tokens.block_hashes(
            ids, self.settings.profile.block_size, tokens.salt_seed(ask.cache_salt)),
            out.num_tokens, out.finish_reason)
        return Answer(len(ids), out, call, seq)

    async def start(self, ask: Ask, request_id: str, stream: bool) -> Answer:
        if sum(len(str(m.get("content", ""))) for m in ask.messages) > THREAD_ABOVE_CHARS:
            answer = await asyncio.to_thread(self.prepare, ask, request_id)
        else:
            answer = self.prepare(ask, request_id)
        if answer.prompt_tokens == 0:
            raise errors.BadRequest("The prompt cannot be empty.", param=ask.where)
        answer.handle = self.engine.submit([answer.seq], stream)
        return answer

    def release(self, answer: Answer) -> None:
        if answer.handle is not None:
            self.engine.abort(answer.handle)  # no-op once finished


def new_id() -> str:
    return uuid.uuid4().hex[:16]


EventWriter = vllm_api.EventWriter   # named events (Responses, Messages)
