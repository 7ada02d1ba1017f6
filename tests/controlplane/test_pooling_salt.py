"""Pooling calls reach an engine in their tenant's prefix-cache partition, as generation
does (``controlplane.core.cache_salt``): vLLM caches the prefixes of decoder embedding
models and takes ``cache_salt`` on its pooling APIs, so an unsalted embedding request
would let one tenant time another's recent inputs."""

from __future__ import annotations

import json

import openai

from controlplane.core import cache_salt
from protos.synapse.v1 import common_pb2, controlplane_pb2
from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane.test_admin import AgentStandIn


class EmbeddingNode(AgentStandIn):
    """A node whose one engine (a simulator, which takes ``cache_salt``) embeds."""

    def __init__(self, url: str) -> None:
        super().__init__("gpu-embed")
        self.url = url

    def report(self, running: int = 0) -> controlplane_pb2.AgentMessage:
        msg = super().report(running)
        backend = msg.report.backends[0]
        backend.url, backend.task = self.url, common_pb2.BACKEND_TASK_EMBED
        return msg


async def test_embeddings_reach_the_engine_salted_per_tenant() -> None:
    async with t.backends(("emb", "ok")) as (engine,):
        s = t.settings(upstreams=[])
        async with t.running(s, with_grpc=True) as cp:
            node = EmbeddingNode(engine.url)
            await node.connect(f"127.0.0.1:{cp.grpc_port}")
            await harness.until(lambda: cp.services.registry.served_models(), 20,
                                "the node's engine to be routable")
            salts = []
            for key in (t.KEY_A, t.KEY_B, t.KEY_A):
                client = openai.AsyncOpenAI(base_url=f"{cp.url}/v1", api_key=key,
                                            max_retries=0)
                await client.embeddings.create(model=t.MODEL, input="the same text")
                await client.close()
                salts.append(json.loads(engine.bodies[-1]).get(cache_salt.FIELD))
            await node.close()
    assert salts[0] and salts[1] and salts[0] != salts[1] and salts[0] == salts[2]
