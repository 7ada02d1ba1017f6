"""The real vLLM 0.32's ``system_fingerprint`` on a stream, through the real control plane
of the session stack (``real_stack``), as vLLM itself places it.

Unasked for usage, vLLM stamps its fingerprint on the finish chunk; asked, on the usage
chunk alone. The control plane asks for usage on the client's behalf (to account the
request) and drops that chunk: the client must still get the fingerprint where vLLM puts
it for a request like its own. The engine is asked directly (with its key) for the same
requests to compare.

This module sorts before test_real_vllm.py, whose last test stops the shared agent.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.engines.stack import RealStack

pytestmark = pytest.mark.timeout(900)

ASK = {"temperature": 0, "max_tokens": 3, "stream": True}
CHAT = {**ASK, "messages": [{"role": "user", "content": "Say yes."}]}
TEXT = {**ASK, "prompt": "Say yes."}


def _marks(client: openai.OpenAI, chat: bool, **extra: Any) -> list[tuple[bool, bool, bool]]:
    """Per chunk: has choices, has a finish_reason, carries a fingerprint."""
    make = client.chat.completions.create if chat else client.completions.create
    body = {**(CHAT if chat else TEXT), **extra}
    chunks = list(make(**body))
    return [(bool(c.choices), any(ch.finish_reason for ch in c.choices),
             (c.system_fingerprint or "").startswith("vllm-")) for c in chunks]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_a_stream_carries_the_fingerprint_where_vllm_puts_it(real_stack: RealStack,
                                                             chat: bool) -> None:
    engine = openai.OpenAI(base_url=real_stack.engine_url + "/v1",
                           api_key=real_stack.engine_key, max_retries=0, timeout=120)
    with real_stack.client() as synapse, engine:
        model = real_stack.model
        direct = _marks(engine, chat, model=model)
        assert direct[-1] == (True, True, True)                 # on the finish chunk
        assert _marks(synapse, chat, model=model) == direct     # was: on no chunk
        asked = {"stream_options": {"include_usage": True}}
        direct = _marks(engine, chat, model=model, **asked)
        assert direct[-2:] == [(True, True, False), (False, False, True)]
        assert _marks(synapse, chat, model=model, **asked) == direct
