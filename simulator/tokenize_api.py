"""``POST /tokenize`` and ``/detokenize`` in vLLM's shapes (vLLM serves them for every
model, whatever its task).

``/tokenize`` takes ``{"prompt"}`` or ``{"messages", "add_generation_prompt": true}``
and answers ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs`` with
``return_token_strs``), counting with ``synapse_common.tokens`` — the same ids and count
the simulator reports in ``usage``. ``/detokenize`` takes ``{"tokens"}`` and answers
``{"prompt"}``.

The shared tokenizer hashes pieces, so ids are turned back into text through a reverse
vocabulary: the simulator's output words from the start, and every piece this process
has tokenized since (at most :data:`VOCAB_LIMIT`). Like vLLM, an id it cannot map
decodes to nothing. The shared tokenizer does not make tokens of single spaces, so
detokenized text has the characters of the original without its spaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web

from simulator import errors, protocol, textgen
from synapse_common import tokens

VOCAB_LIMIT = 200_000


class Vocabulary:
    def __init__(self, seed_texts: Iterable[str] = ()) -> None:
        self._pieces: dict[int, str] = {}
        for text in seed_texts:
            self.learn(text)

    def learn(self, text: str) -> list[int]:
        ids = []
        for piece in tokens.pieces(text):
            token = tokens.token_id(piece)
            if token not in self._pieces and len(self._pieces) < VOCAB_LIMIT:
                self._pieces[token] = piece
            ids.append(token)
        return ids

    def piece(self, token: int) -> str:
        return self._pieces.get(token, "")


def output_vocabulary() -> Vocabulary:
    """Every piece the simulator generates, so generated ids always decode."""
    words = [*textgen.WORDS, *(w.capitalize() for w in textgen.WORDS), "."]
    return Vocabulary(words)


class TokenizeApi:
    def __init__(self, served: list[str], max_model_len: int) -> None:
        self.served = served
        self.max_model_len = max_model_len
        self.vocab = output_vocabulary()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize)]

    def _check_model(self, body: Mapping[str, Any]) -> None:
        protocol.check_served(protocol.model_name(body), self.served)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = protocol.parse_body(await request.read())
        self._check_model(body)
        text = _text(body)
        ids = self.vocab.learn(text)
        strs = [self.vocab.piece(t) for t in ids] if protocol.boolean(
            body, "return_token_strs") else None
        return _json({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                      "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = protocol.parse_body(await request.read())
        self._check_model(body)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise errors.BadRequest("tokens must be a list of non-negative integers.",
                                    param="tokens")
        return _json({"prompt": "".join(self.vocab.piece(t) for t in ids)})


def _text(body: Mapping[str, Any]) -> str:
    if "messages" in body:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise errors.BadRequest("messages must be a list of messages.", param="messages")
        generation = body.get("add_generation_prompt", True) is not False
        return tokens.render_chat(messages, add_generation_prompt=generation)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise errors.BadRequest("prompt must be a string (or send messages).", param="prompt")
    return prompt


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")
