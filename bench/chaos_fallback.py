"""Chaos fault "all backends of the primary model fail" (``bench/chaos.py``: ``primary_down``).

The fleet's model (``llama``) names a fallback model, served by one more engine
simulator that the control planes know as a static upstream of kind ``vllm`` (probed at
``/health``, its ``/metrics`` read). For the fault's duration every engine of the primary
model answers 500 to every request (``error_rate: 1`` through the simulators' fault
knob; their health stays good, so the router keeps choosing them): each request fails on
every candidate of the primary before its first byte and must be served by the fallback
model within the same request (``x-synapse-fallback: A->B``). The fallback engine stays
healthy throughout, so every failed request counts as failed with a healthy backend; the
answers of the fallback model are never cached as the primary's (``wrongly_cached``).
``fallbacks`` (the replicas' ``synapse_fallbacks_total``) says how many it served.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
from collections.abc import Callable
from typing import Any, Protocol

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # run as a file from anywhere: bench/ imports
    sys.path.insert(0, str(REPO))

from tests import fleet  # noqa: E402

MODEL = "chaos-fallback-model"
NAME = "fallback"


class Fleet(Protocol):
    engine_ports: dict[str, int]
    faulted: set[str]

    def engine_url(self, name: str) -> str: ...


def argv(port: int, time_scale: float) -> list[str]:
    """The fallback model's engine simulator."""
    return fleet.simulator_argv(port, MODEL, time_scale=time_scale)


def sections(port: int) -> dict[str, Any]:
    """Control-plane config: the primary model falls back to MODEL, served by a static
    upstream of kind vllm on ``port``."""
    return {"models": [{"name": fleet.MODEL, "aliases": ["llama"], "fallbacks": [MODEL]},
                       {"name": MODEL}],
            "upstreams": [{"name": NAME, "url": f"http://127.0.0.1:{port}/v1", "kind": "vllm",
                           "models": [MODEL]}]}


async def primary_down(fl: Fleet, duration: float, info: dict[str, Any],
                       set_faults: Callable[..., None]) -> None:
    """Every engine of the primary model answers 500 for ``duration`` seconds."""
    names = list(fl.engine_ports)
    fl.faulted.update(names)
    try:
        await asyncio.gather(*(asyncio.to_thread(set_faults, fl.engine_url(n), error_rate=1.0)
                               for n in names))
        await asyncio.sleep(duration)
    finally:
        await asyncio.gather(*(asyncio.to_thread(set_faults, fl.engine_url(n), error_rate=0.0)
                               for n in names))
        fl.faulted.difference_update(names)
    info["primaries_failed"] = len(names)
