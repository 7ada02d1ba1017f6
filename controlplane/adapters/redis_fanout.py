"""Ask every replica at once through Redis and gather the answers (scatter-gather).

Every replica subscribes to one channel. :meth:`Fanout.ask` publishes a fresh reply key
on it; ``PUBLISH`` returns how many subscribers received it, which is how many replicas
were asked. Each answers by pushing its payload onto the reply key (which expires after
:data:`REPLY_TTL_S`), and the asker pops answers until all have come or its time is up —
so a caller learns both what the fleet said and how much of the fleet said it. The asker
does not answer its own question (it has its own figures at hand): its message carries
this process's key prefix and its subscriber skips it.

Without sharded pub/sub this needs one Redis (or a cluster's classic pub/sub, which
reaches every node). A lost subscription is re-made after :data:`RETRY_S`; errors go to
``on_error`` (the caller counts and logs them) and never to the answerer.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from synapse_common import clock as clocks

REPLY_TTL_S = 30
RETRY_S = 1.0
ANSWER_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 1.0    # as redis_limits.connect's (adapters do not import each other)


class Fanout:
    def __init__(self, url: str, channel: str, answer: Callable[[], Awaitable[bytes]],
                 on_error: Callable[[Exception], None] = lambda exc: None) -> None:
        # read time-out too: a Redis that accepts and never answers fails each call
        # (a subscriber's wait for messages is not bounded by it: redis-py blocks there)
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=READ_TIMEOUT_S)
        self.channel = channel
        self._answer = answer
        self._on_error = on_error
        self._prefix = f"{channel}:reply:{uuid.uuid4().hex[:16]}:".encode()
        self._pending: set[asyncio.Task[None]] = set()
        self.subscribed = False

    async def run(self) -> None:
        """Answer the other replicas' questions until cancelled."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed = True
                async for message in pubsub.listen():
                    self._on_message(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._on_error(exc)
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
            await clocks.sleep(RETRY_S)

    def _on_message(self, message: dict[str, Any]) -> None:
        key = message.get("data")
        if message.get("type") != "message" or not isinstance(key, bytes) \
                or key.startswith(self._prefix):
            return
        task = asyncio.get_running_loop().create_task(self._reply(key))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reply(self, key: bytes) -> None:
        try:
            payload = await self._answer()
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.rpush(key, payload)
                    pipe.expire(key, REPLY_TTL_S)
                    await pipe.execute()
        except Exception as exc:
            self._on_error(exc)

    async def ask(self, timeout_s: float) -> tuple[int, list[bytes]]:
        """(how many other replicas were asked, the answers that came within
        ``timeout_s``); raises what Redis raised when the question could not be sent."""
        key = self._prefix + uuid.uuid4().hex.encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with asyncio.timeout(timeout_s):
            receivers = int(await self._client.publish(self.channel, key))
        asked = max(0, receivers - (1 if self.subscribed else 0))
        answers: list[bytes] = []
        try:
            while len(answers) < asked and (left := deadline - loop.time()) > 0:
                async with asyncio.timeout(left + 1.0):
                    got = await self._client.blpop([key], timeout=left)
                if got is None:
                    break
                value = got[1]
                answers.append(value if isinstance(value, bytes) else str(value).encode())
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._client.delete(key)
        return asked, answers

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await self._client.aclose()
