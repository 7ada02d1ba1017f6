"""One logging setup: human lines by default, JSON lines on request, context fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from synapse_common import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    yield buf
    logging.getLogger().handlers.clear()


def test_json_lines_carry_request_id_and_node(stream: io.StringIO) -> None:
    logs.setup(fmt="json", stream=stream)
    with logs.bind(request_id="req-123", node="gpu-a"):
        logging.getLogger("synapse.test").info("routed to %s", "b1", extra={"backend": "b1"})
    doc = json.loads(stream.getvalue().strip())
    assert doc["msg"] == "routed to b1"
    assert doc["request_id"] == "req-123" and doc["node"] == "gpu-a" and doc["backend"] == "b1"
    assert doc["level"] == "info" and doc["ts"].endswith("Z")


def test_human_format_is_one_readable_line(stream: io.StringIO) -> None:
    logs.setup(fmt="human", stream=stream)
    with logs.bind(request_id="req-9"):
        logging.getLogger("synapse.test").warning("slow backend")
    line = stream.getvalue().strip()
    assert "WARNING" in line and "slow backend" in line and "request_id=req-9" in line
    assert "\n" not in line


def test_context_does_not_leak_between_binds(stream: io.StringIO) -> None:
    logs.setup(fmt="json", stream=stream)
    with logs.bind(request_id="a"):
        pass
    logging.getLogger("synapse.test").info("outside")
    assert "request_id" not in json.loads(stream.getvalue().strip())
