"""The report stream in process against a real gRPC control-plane server."""

from __future__ import annotations

import asyncio
import pathlib
import random

import grpc
import pytest
from prometheus_client import CollectorRegistry

from agent import metrics, reporter
from agent.config import ControlPlaneLink
from agent.core import backoff
from protos.synapse.v1 import controlplane_pb2
from tests import fleet, harness
from tests.agent.control_plane import ControlPlaneServer
from tests.clock import VirtualTime


class Node:
    """The agent side the reporter needs: messages and a command handler."""

    def __init__(self) -> None:
        self.sequence = 0
        self.commands: list[str] = []
        self.state = "a"

    def register(self) -> controlplane_pb2.Register:
        return controlplane_pb2.Register(node_name="n1", agent_version="t")

    def report(self) -> controlplane_pb2.Report:
        self.sequence += 1
        return controlplane_pb2.Report(sequence=self.sequence,
                                       draining=self.state == "draining")

    async def command(self, msg: controlplane_pb2.ControlMessage) -> tuple[bool, str]:
        self.commands.append(msg.WhichOneof("body"))
        if msg.HasField("evict_embeddings"):
            raise RuntimeError("boom")
        return True, ""


def _reporter(node: Node, **cfg) -> reporter.Reporter:
    link = ControlPlaneLink(**{"addresses": [], "report_interval_s": 30,
                               "reconnect_min_s": 0.05, "reconnect_max_s": 0.2,
                               "connect_timeout_s": 1, **cfg})
    return reporter.Reporter(link, node.register, node.report, node.command,
                             metrics.Metrics(CollectorRegistry()), "n1")


async def test_reconnects_and_registers_again_after_control_plane_restart():
    """On virtual time: the reports come every report_interval_s and the reconnect waits
    exactly its backoff, asserted from the waits themselves, none of them waited out."""
    server = ControlPlaneServer()
    server.start()
    vt, registry, node = VirtualTime(), CollectorRegistry(), Node()
    link = ControlPlaneLink(addresses=[server.address], report_interval_s=0.3,
                            reconnect_min_s=0.1, reconnect_max_s=0.5, connect_timeout_s=5)
    rep = reporter.Reporter(link, node.register, node.report, node.command,
                            metrics.Metrics(registry), "n1", timing=vt.time,
                            rng=random.Random(7))

    def connected() -> float | None:
        return registry.get_sample_value("synapse_agent_control_plane_connected",
                                         {"node": "n1", "address": server.address})

    await rep.start()
    recorder = server.recorder
    await harness.until(lambda: recorder.reports() and vt.due() == [0.3], 10,
                        "the first report, and the next one due an interval later")
    await vt.advance(0.3)
    await harness.until(lambda: len(recorder.reports()) >= 2, 10, "reports")
    register = recorder.registers()[0]
    assert register.node_name == "n1" and register.agent_version
    sequences = [r.sequence for r in recorder.reports()]
    assert sequences == sorted(sequences)

    server.stop()
    await harness.until(lambda: connected() == 0.0, 10, "the reporter to notice the lost stream")
    wait = backoff.Backoff(0.1, 0.5, random.Random(7)).delay(0)   # the first rung, jittered
    await harness.until(lambda: vt.due() == [pytest.approx(0.3 + wait)], 10,
                        "the reconnect to wait its backoff from the loss")
    server.start()  # same port
    await vt.advance(wait)
    await harness.until(lambda: len(recorder.registers()) == 2, 10, "a second Register")
    for _ in range(2):
        await harness.until(lambda: vt.due() == [pytest.approx(vt.now + 0.3)], 10,
                            "the next report due")
        await vt.advance(0.3)
    await harness.until(lambda: len(recorder.streams[-1]) >= 3, 10, "reports on the new stream")
    assert recorder.streams[-1][0].HasField("register")
    assert connected() == 1.0
    # stop() while the loop is between reports: stopped mid-write, it has nothing to coalesce
    await harness.until(lambda: vt.due() == [pytest.approx(vt.now + 0.3)], 10,
                        "the loop back in its interval wait")

    stopping = asyncio.create_task(rep.stop())   # one last report, after the coalesce wait
    await harness.until(lambda: vt.due() == [pytest.approx(vt.now + reporter.COALESCE_S)], 10,
                        "the last report's coalesce wait")
    await vt.advance(reporter.COALESCE_S)
    await stopping
    server.stop()


class TokenCheck(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def intercept_service(self, continuation, details):
        self.seen.append(dict(details.invocation_metadata).get("authorization", ""))
        return continuation(details)


async def test_dns_name_is_dialled_reports_on_change_and_commands_are_acked():
    server = ControlPlaneServer()
    server.start()
    node = Node()
    rep = _reporter(node, dns_name=f"localhost:{server.port}", token="s3cret-token")
    await rep.start()
    rec = server.recorder
    await harness.until(lambda: rec.registers() and rec.reports(), 10, "register + first report")
    assert rep.targets == [f"127.0.0.1:{server.port}"]
    assert rec.streams[0][0].HasField("register")

    count = len(rec.reports())
    node.state = "draining"
    rep.notify()  # a state change: reported at once, not after the 30 s interval
    # immediate: within seconds a loaded machine may need, far from the 30 s interval
    await harness.until(lambda: len(rec.reports()) > count and rec.reports()[-1].draining, 10,
                        "an immediate report")

    rec.send(controlplane_pb2.ControlMessage(command_id="c1", undrain=controlplane_pb2.Undrain()))
    rec.send(controlplane_pb2.ControlMessage(
        command_id="c2", evict_embeddings=controlplane_pb2.EvictEmbeddings()))
    await harness.until(lambda: len(rec.acks()) == 2, 10, "two acks")
    acks = {a.command_id: a for a in rec.acks()}
    assert acks["c1"].ok and not acks["c2"].ok and "boom" in acks["c2"].error

    before = len(rec.reports())
    await rep.stop()
    assert len(rec.reports()) == before + 1  # a last report on the way out
    server.stop()


async def test_the_token_travels_as_bearer_metadata():
    from concurrent import futures

    from protos.synapse.v1 import controlplane_pb2_grpc
    from tests.agent.control_plane import Recorder

    check = TokenCheck()
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[check])
    recorder = Recorder()
    controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rep = _reporter(Node(), addresses=[f"127.0.0.1:{port}"], token="s3cret-token")
    await rep.start()
    await harness.until(lambda: recorder.registers(), 10, "register")
    await rep.stop()
    server.stop(0)
    assert check.seen and check.seen[0] == "Bearer s3cret-token"
    assert "s3cret" not in repr(rep.cfg)


@pytest.fixture
def self_signed(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = fleet.self_signed_cert(tmp_path)
    return pathlib.Path(key), pathlib.Path(cert)


async def test_tls_to_the_control_plane_with_a_configured_ca(self_signed):
    from concurrent import futures

    from protos.synapse.v1 import controlplane_pb2_grpc
    from tests.agent.control_plane import Recorder

    key, cert = self_signed
    server = grpc.server(futures.ThreadPoolExecutor(4))
    recorder = Recorder()
    controlplane_pb2_grpc.add_ControlPlaneServicer_to_server(recorder, server)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    rep = _reporter(Node(), addresses=[f"127.0.0.1:{port}"], tls_ca_file=str(cert))
    await rep.start()
    await harness.until(lambda: recorder.registers(), 10, "a Register over TLS")
    await rep.stop()
    server.stop(0)


class _SilentRefusal:
    """A Connect stream the control plane refused right after Register, whose read never
    wakes up to it (seen under load: the agent logged 'registered', then nothing)."""

    def __init__(self) -> None:
        self.written: list[str] = []

    async def write(self, msg: controlplane_pb2.AgentMessage) -> None:
        self.written.append(msg.WhichOneof("body"))

    async def read(self) -> object:
        await asyncio.Event().wait()        # never

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    async def details(self) -> str:
        return "no agent token"

    async def done_writing(self) -> None:
        pass

    def cancel(self) -> bool:
        return True


class _Channel:
    async def __aenter__(self) -> _Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def channel_ready(self) -> None:
        pass


def _session_on(monkeypatch, call: _SilentRefusal, within: float | None = 5):
    """A session of a reporter whose Connect returns ``call`` (bounded by ``within``
    seconds, or not at all), and its connected gauge."""
    stub = type("Stub", (), {"__init__": lambda self, channel: None,
                             "Connect": lambda self, metadata: call})
    monkeypatch.setattr(reporter.controlplane_pb2_grpc, "ControlPlaneStub", stub)
    r = _reporter(Node())
    monkeypatch.setattr(r, "_channel", lambda address: _Channel())
    gauge = metrics.Metrics(CollectorRegistry()).control_plane_connected.labels("n1", "cp")
    session = r._session("cp", gauge)
    return (session if within is None else asyncio.wait_for(session, within)), gauge


async def test_a_refusal_the_read_never_wakes_up_to_still_ends_the_session(monkeypatch):
    call = _SilentRefusal()
    monkeypatch.setattr(reporter, "STATUS_GRACE_S", 0.05)
    session, _ = _session_on(monkeypatch, call)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await session
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details() == "no agent token" and call.written[0] == "register"


class _Deaf(_SilentRefusal):
    """A refused stream whose read wakes up neither to the status nor to its first
    cancellation (the agent sat silent, never dialling again: seen in full test runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.deaf = 1

    async def read(self) -> object:
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if not self.deaf:
                    raise
                self.deaf -= 1


async def test_a_read_deaf_to_its_cancellation_does_not_hold_the_session(monkeypatch):
    """Nothing outside cancels a session: one that waited on such a read never ended."""
    call = _Deaf()
    monkeypatch.setattr(reporter, "STATUS_GRACE_S", 0.05)
    session, _ = _session_on(monkeypatch, call, within=None)
    task = asyncio.ensure_future(session)
    done, _ = await asyncio.wait({task}, timeout=30)     # a hang guard, not a timing
    assert task in done, "the session waited for ever on a read deaf to its cancellation"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        task.result()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


class _Unanswered(_SilentRefusal):
    """A stream the control plane never answers on: no message, no status (seen: a
    refused agent logged 'registered' and then nothing for 30 s)."""

    async def code(self) -> grpc.StatusCode:
        await asyncio.Event().wait()        # never
        raise AssertionError


async def test_a_stream_never_answered_is_given_up_and_never_counted_registered(
        monkeypatch, caplog):
    call = _Unanswered()
    monkeypatch.setattr(reporter, "ANSWER_TIMEOUT_S", 0.05)
    session, gauge = _session_on(monkeypatch, call)
    with caplog.at_level("INFO", logger="agent.reporter"), pytest.raises(TimeoutError) as info:
        await session
    assert "no answer to Register within 0.05s" in str(info.value)
    assert call.written[:2] == ["register", "report"]
    assert "registered" not in caplog.text and gauge._value.get() == 0


async def test_a_session_that_fails_unexpectedly_is_logged_and_dialled_again(monkeypatch,
                                                                             caplog):
    """The dialling task is the agent's only link to a control plane: an exception nobody
    foresaw ended it silently (the agent never dialled again and said nothing)."""
    r = _reporter(Node())
    calls = 0
    again = asyncio.Event()

    async def session(address: str, gauge: object) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        again.set()
        await asyncio.Event().wait()
        return True
    monkeypatch.setattr(r, "_session", session)
    with caplog.at_level("WARNING", logger="agent.reporter"):
        task = asyncio.ensure_future(r._dial_forever("cp"))
        await asyncio.wait_for(again.wait(), 30)        # a hang guard
    assert any("RuntimeError: boom" in m for m in caplog.messages), caplog.messages
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
