"""synapsectl against a real gRPC server playing the Admin service: tables, -o json/yaml,
the token in metadata, exit codes 0 / 1 / 2 and one-line errors."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import grpc
import pytest
import yaml

from protos.synapse.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from tests import harness
from tests.controlplane import ctl_testing

TOKEN = "admin-token-for-ctl-tests"


class AdminForTests(admin_pb2_grpc.AdminServicer):
    def __init__(self) -> None:
        self.seen_tokens: list[str] = []

    def _auth(self, context: grpc.ServicerContext) -> None:
        token = dict(context.invocation_metadata()).get("authorization", "")
        self.seen_tokens.append(token)
        if token != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")

    def ListNodes(self, request, context):
        self._auth(context)
        return admin_pb2.ListNodesResponse(nodes=[admin_pb2.NodeSummary(
            name="gpu-a", status=admin_pb2.NODE_STATUS_READY, gpu_count=1, backends_ready=1,
            backends_total=1, last_report_age_seconds=1.5, agent_version="0.1.0",
            telemetry=common_pb2.TelemetryStatus(source="fake", ok=True))])

    def GetNode(self, request, context):
        self._auth(context)
        if request.name != "gpu-a":
            context.abort(grpc.StatusCode.NOT_FOUND, f"node {request.name!r} not found")
        return admin_pb2.NodeDetail(
            summary=admin_pb2.NodeSummary(name="gpu-a", status=admin_pb2.NODE_STATUS_READY),
            gpus=[common_pb2.GpuSample(index=0, name="Simulated H100", memory_total_bytes=80 << 30,
                                       memory_used_bytes=20 << 30)],
            backends=[common_pb2.BackendState(name="sim", models=["m"], url="http://x",
                                              phase=common_pb2.BACKEND_PHASE_READY,
                                              last_log_lines=["ready"])])

    def CordonNode(self, request, context):
        # As the Admin service answers: the node's detail, or for a name no node has
        # registered under, the recorded intent alone (report age zero).
        self._auth(context)
        summary = admin_pb2.NodeSummary(name=request.name, status=admin_pb2.NODE_STATUS_CORDONED,
                                        cordoned=True)
        if request.name == "gpu-a":
            summary.agent_version, summary.last_report_age_seconds = "0.1.0", 1.5
        return admin_pb2.NodeDetail(summary=summary)

    def ExplainRoute(self, request, context):
        self._auth(context)
        return admin_pb2.ExplainRouteResponse(
            model=request.model, policy="predicted_ttft", chosen_backend="sim-1", prompt_tokens=9,
            tokenizer="approximate",
            backends=[admin_pb2.BackendVerdict(node="gpu-a", backend="sim-1", eligible=True,
                                               predicted_ttft_seconds=0.01, rank=1,
                                               block_size=128, prefill_seconds_per_token=0.0005,
                                               decode_seconds_per_step=0.03, cost_samples=12),
                      admin_pb2.BackendVerdict(node="gpu-b", backend="sim-2", eligible=False,
                                               filter_reason="node cordoned")])


@pytest.fixture
def admin_server() -> Iterator[tuple[str, AdminForTests]]:
    servicer = AdminForTests()
    with ctl_testing.serve_admin(servicer) as addr:
        yield addr, servicer


run = ctl_testing.run


def test_get_nodes_table_with_token_from_env(admin_server: tuple[str, AdminForTests]) -> None:
    addr, servicer = admin_server
    code, out, _ = run(["get", "nodes"], {"SYNAPSE_ADMIN_ADDR": addr, "SYNAPSE_ADMIN_TOKEN": TOKEN})
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "STATUS", "GPUS"]
    assert row.split()[:3] == ["gpu-a", "ready", "1"]
    assert servicer.seen_tokens == [f"Bearer {TOKEN}"]


def test_output_json_and_yaml(admin_server: tuple[str, AdminForTests], tmp_path) -> None:
    addr, _ = admin_server
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    code, out, _ = run(["get", "nodes", "-o", "json", "--server", addr, "--token-file",
                        str(token_file)])
    assert code == 0 and json.loads(out)[0]["name"] == "gpu-a"
    code, out, _ = run(["-o", "yaml", "--server", addr, "--token-file", str(token_file),
                        "describe", "node", "gpu-a"])
    assert code == 0 and yaml.safe_load(out)["summary"]["name"] == "gpu-a"


def test_describe_node_shows_gpus_backends_and_logs(admin_server) -> None:
    addr, _ = admin_server
    code, out, _ = run(["describe", "node", "gpu-a", "--server", addr],
                       {"SYNAPSE_ADMIN_TOKEN": TOKEN})
    assert code == 0
    assert "Simulated H100" in out and "ready" in out and "Last log lines of sim" in out


def test_server_refusal_is_exit_1_with_one_line(admin_server) -> None:
    addr, _ = admin_server
    code, out, err = run(["describe", "node", "nope", "--server", addr],
                         {"SYNAPSE_ADMIN_TOKEN": TOKEN})
    assert code == 1 and out == ""
    assert err.strip() == "synapsectl: error: NOT_FOUND: node 'nope' not found"


def test_missing_token_is_refused(admin_server) -> None:
    addr, _ = admin_server
    code, _, err = run(["get", "nodes", "--server", addr])
    assert code == 1 and "UNAUTHENTICATED" in err


def test_explain_lists_candidates_and_filtered_backends(admin_server) -> None:
    addr, _ = admin_server
    code, out, _ = run(["explain", "--model", "m", "--prompt", "hi", "--server", addr],
                       {"SYNAPSE_ADMIN_TOKEN": TOKEN})
    assert code == 0
    assert "chosen: sim-1" in out and "node cordoned" in out
    assert "tokenizer approximate" in out and "500us/tok 30.0ms/step +0ms (learned/12)" in out


def test_usage_errors_exit_2() -> None:
    assert run([])[0] == 2
    assert run(["get", "pods"])[0] == 2
    assert run(["cache", "invalidate"])[0] == 2


def test_unreachable_server_is_one_line() -> None:
    code, _, err = run(["get", "nodes", "--server", "127.0.0.1:1", "--timeout", "2"])
    assert code == 1 and err.count("\n") == 1 and "cannot reach the Admin service" in err


def test_an_engines_log_lines_cannot_drive_the_terminal() -> None:
    """``describe node`` printed an engine's (or an agent's) last lines raw (probe finding)."""
    from controlplane import ctl_render
    from protos.synapse.v1 import admin_pb2 as admin
    detail = admin.NodeDetail(backends=[common_pb2.BackendState(
        name="sim", last_log_lines=["ok \x1b]0;pwned\x07 \x1b[2J\x9b done\ttab"])])
    text = ctl_render.node_detail(detail).table
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    assert "ok \\x1b]0;pwned\\x07 \\x1b[2J\\x9b done\ttab" in text


def test_cordon_of_a_name_no_node_has_says_so_and_warns(admin_server) -> None:
    """Probe 82 F8: ``cordon gpu-nde-1`` (a typo) printed ``Status: cordoned`` and ``Last
    report: 0s ago`` as for a live node, while the real node went on serving."""
    addr, _ = admin_server
    env = {"SYNAPSE_ADMIN_ADDR": addr, "SYNAPSE_ADMIN_TOKEN": TOKEN}
    code, out, err = run(["cordon", "gpu-aa"], env)
    assert code == 0        # recorded: a node may be cordoned before it registers
    assert "Last report:  never" in out and "0s ago" not in out
    assert "cordoned (not registered yet; intent recorded)" in out
    assert err.startswith("synapsectl: warning: no node named 'gpu-aa' is registered "
                          "(did you mean 'gpu-a'?)")
    code, out, _ = run(["cordon", "gpu-aa", "-o", "json"], env)
    assert code == 0 and json.loads(out)["registered"] is False
    code, out, err = run(["cordon", "gpu-a"], env)
    assert code == 0 and err == "" and "Last report:  2s ago" in out


def test_a_reader_that_stops_early_ends_it_quietly(admin_server) -> None:
    """Probe 82 F8: ``synapsectl ... | head -1`` ended with a BrokenPipeError traceback."""
    addr, _ = admin_server
    proc = subprocess.Popen([harness.console_script("synapsectl"), "get", "nodes"],
                            env={"SYNAPSE_ADMIN_ADDR": addr, "SYNAPSE_ADMIN_TOKEN": TOKEN},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()         # gone before the table is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""
