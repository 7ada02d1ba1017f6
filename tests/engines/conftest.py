"""One real stack (control plane, agent, real vLLM) for the whole session, response cache
off so that every answer comes from the engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.engines import stack


@pytest.fixture(scope="session")
def real_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.RealStack]:
    with stack.start(tmp_path_factory.mktemp("engines"), cache={"enabled": False}) as running:
        yield running
