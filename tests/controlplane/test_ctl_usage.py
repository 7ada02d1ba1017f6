"""synapsectl get usage: the table (with a total line), plain numbers in -o json / yaml,
--since durations, against a real gRPC server playing the Admin service."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml

from protos.synapse.v1 import admin_pb2, admin_pb2_grpc
from tests.controlplane import ctl_testing

ROWS = [admin_pb2.UsageRow(day="2026-03-14", tenant="search", model="llama", requests=3,
                           prompt_tokens=300, completion_tokens=90, cached_tokens=64,
                           cache_hit_tokens=0, errors=1, cost=0.0123),
        admin_pb2.UsageRow(day="2026-03-15", tenant="search", model="llama", requests=2,
                           prompt_tokens=200, completion_tokens=60, cache_hit_tokens=260,
                           cost=0.01)]


class Usage(admin_pb2_grpc.AdminServicer):
    def __init__(self) -> None:
        self.asked: list[admin_pb2.GetUsageRequest] = []

    def GetUsage(self, request, context):
        self.asked.append(request)
        rows = [r for r in ROWS if not request.tenant or r.tenant == request.tenant]
        return admin_pb2.GetUsageResponse(rows=rows)


@pytest.fixture
def server() -> Iterator[tuple[str, Usage]]:
    servicer = Usage()
    with ctl_testing.serve_admin(servicer) as addr:
        yield addr, servicer


def run(argv: list[str]) -> tuple[int, str, str]:
    return ctl_testing.run(argv, {"SYNAPSE_ADMIN_TOKEN": "t"})


def test_table_with_a_total_and_the_period_asked(server: tuple[str, Usage]) -> None:
    addr, servicer = server
    code, out, _ = run(["--server", addr, "get", "usage", "--tenant", "search", "--since", "7d"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DAY", "TENANT", "MODEL", "REQUESTS", "PROMPT", "COMPLETION",
                                "CACHED", "CACHE-HIT", "ERRORS", "ESTIMATED", "COST"]
    assert lines[-1].split() == ["total", "-", "-", "5", "500", "150", "64", "260", "1", "0",
                                 "0.0223"]
    assert servicer.asked[-1].tenant == "search"
    assert servicer.asked[-1].since_seconds == 7 * 86_400


def test_json_and_yaml_hold_plain_numbers(server: tuple[str, Usage]) -> None:
    addr, _ = server
    code, out, _ = run(["--server", addr, "get", "usage", "-o", "json"])
    rows = json.loads(out)
    assert code == 0 and rows[0]["prompt_tokens"] == 300 and rows[1]["cost"] == 0.01
    code, out, _ = run(["--server", addr, "get", "usage", "--since", "30m", "-o", "yaml"])
    assert code == 0 and yaml.safe_load(out)[1]["cache_hit_tokens"] == 260


def test_a_bad_duration_is_a_usage_error(server: tuple[str, Usage]) -> None:
    addr, _ = server
    code, _, err = run(["--server", addr, "get", "usage", "--since", "soon"])
    assert code == 2 and "not a duration" in err
