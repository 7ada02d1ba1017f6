"""The response cache never crosses tenants, checked at load: two tenants ask the same
questions (and paraphrases) concurrently through both replicas, which share the Redis L1.

Proof of origin: the simulators run with ``--answer-origin``, so every whole answer names,
in its ``origin`` field, the request that produced it (built from the ``x-request-id`` the
control plane forwards); an answer replayed from the cache keeps it (its ``id`` is fresh). Every answer a tenant receives must come from one of *that tenant's*
requests; the test also checks that the cache did serve hits (else it proves nothing).
Paraphrases (asked after their originals were stored) make semantic hits too; every
scope dimension of the semantic layer is covered one by one by
``tests/controlplane/test_response_cache_isolation.py``.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp

from tests import fleet
from tests.security.conftest import SecureFleet

TOPICS = ["my password", "my email address", "the router", "my phone", "the printer",
          "my account", "the app", "my profile picture", "the wifi", "my username"]
ORIGINALS = [f"How do I reset {t}?" for t in TOPICS]
PARAPHRASES = [f"How can I reset {t}?" for t in TOPICS]
# Paraphrases come first in round 1, after the originals were stored: semantic candidates.
ROUNDS = [ORIGINALS, PARAPHRASES, ORIGINALS + PARAPHRASES, ORIGINALS + PARAPHRASES]
TENANTS = {"team": fleet.TENANT_KEY, "other": fleet.OTHER_KEY}


async def _ask(session: aiohttp.ClientSession, url: str, key: str, question: str,
               ) -> tuple[str, str, str]:
    body = fleet.chat_body(question, temperature=0, max_tokens=6)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return resp.headers["x-request-id"], resp.headers["x-synapse-cache"], data["origin"]


async def _load(urls: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    out: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=64)) as session:
        for questions in ROUNDS:
            # Topic i always goes to replica i % 2: each replica has its own Milvus Lite
            # file, so paraphrases meet their originals' L2 rows there (and both tenants
            # share that index), while the Redis L1 is shared by both replicas.
            jobs = [(tenant, _ask(session, urls[(i % len(TOPICS)) % 2], key, q))
                    for i, q in enumerate(questions) for tenant, key in TENANTS.items()]
            results = await asyncio.gather(*(job for _, job in jobs))
            for (tenant, _), result in zip(jobs, results, strict=True):
                out[tenant].append(result)
            await asyncio.sleep(1.0)   # stores land off the hot path
    return out


def test_no_answer_crosses_tenants_under_concurrent_load(secure: SecureFleet) -> None:
    seen = asyncio.run(_load(secure.urls))
    own_ids = {t: {rid for rid, _, _ in rows} for t, rows in seen.items()}
    hits = collections.Counter()
    for tenant, rows in seen.items():
        for rid, cache, completion_id in rows:
            origin = completion_id.removeprefix("chatcmpl-")
            assert origin in own_ids[tenant], (tenant, cache, completion_id)
            if cache.startswith("hit"):
                assert origin != rid
                hits[(tenant, cache)] += 1
    assert hits[("team", "hit-exact")] > 0 and hits[("other", "hit-exact")] > 0, hits
    assert hits[("team", "hit-semantic")] + hits[("other", "hit-semantic")] > 0, hits
