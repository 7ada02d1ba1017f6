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


def test_a_urls_credentials_never_reach_a_line(stream: io.StringIO) -> None:
    """Probe finding: an upstream's URL with a password was logged at every health change."""
    logs.setup(fmt="human", stream=stream)
    log = logging.getLogger("synapse.test")
    log.warning("upstream %s is unhealthy (%s)", "static/sim",
                "http://user:UPSTREAMPW-SECRET@127.0.0.1:8000/health",
                extra={"backend": "redis://:REDISPW@h:6379/0"})
    try:
        raise ConnectionError("cannot reach ftp://me:FTPPW@files.example/x")
    except ConnectionError:
        log.exception("failed")
    out = stream.getvalue()
    for secret in ("UPSTREAMPW-SECRET", "REDISPW", "FTPPW", "user:", "me:"):
        assert secret not in out
    assert "http://***@127.0.0.1:8000/health" in out and "redis://***@h:6379/0" in out
    log.info("plain http://127.0.0.1:8000/v1?next=a@b stays")
    assert "plain http://127.0.0.1:8000/v1?next=a@b stays" in stream.getvalue()


def test_a_password_holding_an_at_sign_is_masked_whole() -> None:
    """Masking stopped at the first ``@``: ``p@ss`` left ``ss`` in the log (and now in
    synapsectl's output and the settings' repr, which use the same rule)."""
    assert logs.mask_url_credentials("http://bob:p@ss@10.0.0.1:8000/v1?x=a@b") == \
        "http://***@10.0.0.1:8000/v1?x=a@b"
    assert logs.mask_url_credentials("http://10.0.0.1:8000") == "http://10.0.0.1:8000"


@pytest.mark.parametrize("url", ["http://bob:hunter2\t@10.0.0.1:8000/v1",
                                 "http://bob:hun ter2@10.0.0.1:8000/v1",
                                 "http://bob:hunter2\n@10.0.0.1:8000/v1",
                                 "http://bob:hunter2\x01\u2028@10.0.0.1:8000/v1"])
def test_credentials_holding_whitespace_or_controls_are_masked(url: str) -> None:
    """Review 91 F6: the mask stopped at whitespace, but URL parsers drop a tab or a newline
    and encode a space, so such a URL works and its password showed in clear."""
    assert logs.mask_url_credentials(f"upstream {url} down") == \
        "upstream http://***@10.0.0.1:8000/v1 down"


def test_a_field_cannot_forge_another_in_the_human_format(stream: io.StringIO) -> None:
    """Probe finding: a client's request id ``forged tenant=bob status=200`` read as fields."""
    logs.setup(fmt="human", stream=stream)
    logging.getLogger("synapse.test").warning(
        "stream cut", extra={"request_id": "forged tenant=bob status=200\nINFO fake",
                             "backend": "static/sim"})
    line = stream.getvalue().strip()
    assert "\n" not in line
    assert 'request_id="forged tenant=bob status=200\\nINFO fake"' in line
    assert "backend=static/sim" in line


def test_pymilvus_lines_go_through_the_format_and_the_redaction(stream: io.StringIO) -> None:
    """pymilvus installs its own stderr handlers on import: its lines skipped the JSON
    format and the redaction (probe finding)."""
    import pymilvus  # noqa: F401  (its import configures its loggers)
    logs.setup(fmt="json", secrets=["MILVUS-SECRET-TOKEN"], stream=stream)
    logs.adopt("pymilvus")
    logging.getLogger("pymilvus.milvus_client").error("failed with MILVUS-SECRET-TOKEN")
    doc = json.loads(stream.getvalue().strip())
    assert doc["logger"] == "pymilvus.milvus_client" and doc["msg"] == "failed with ***"
    assert not logging.getLogger("pymilvus").handlers
