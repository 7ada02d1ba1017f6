"""Certificates pinned through Register (``Register.node_certificate``, an agent's
``grpc.tls_self_signed``): what the control plane accepts, how the registry keeps a pin
per address, that the pod's workers pin what the primary accepted, and that Node calls
trust the pinned certificate alone, dial again when it changes, and (with
``grpc.node_tls_required``) call no agent in plain text.

The agents' side is the agent's real Node server (``agent.node_service``) with no
embedder and no pair scorer: a ``ScorePairs`` that reaches it is answered "no scorer"
(:class:`node_embed.NoScorer`), one that does not get past the handshake fails otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator

import grpc
import pytest

from agent import node_certificate, node_service
from controlplane.adapters import agent_relay, node_embed
from controlplane.api import agent_messages, grpc_server
from controlplane.api import services as services_mod
from controlplane.core import types
from protos.synapse.v1 import controlplane_pb2
from tests import harness
from tests.controlplane import cp_testing as t
from tests.controlplane.test_agent_relay import worker
from tests.controlplane.test_grpc_server import Agent

KEY = "node-key-of-this-test-5b1e9c0d7a3f"


def register(pem: bytes, name: str = "gpu-1",
             address: str = "127.0.0.1:1") -> controlplane_pb2.AgentMessage:
    return controlplane_pb2.AgentMessage(register=controlplane_pb2.Register(
        node_name=name, agent_version="test", node_address=address,
        embed_models=["minilm"], node_certificate=pem))


def pin(made: node_certificate.NodeCertificate) -> types.NodePin:
    found = agent_messages.node_pin(made.certificate)
    assert found is not None
    return found


# -- what a Register may carry ------------------------------------------------------------


def _without_dns_name() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "synapse-agent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("pem", [
    b"not a certificate",
    b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    node_certificate.generate().certificate + node_certificate.generate().certificate,
    node_certificate.generate().key,
    b"x" * (agent_messages.MAX_CERTIFICATE_BYTES + 1),
    _without_dns_name(),
], ids=["text", "bad-base64", "two", "a-key", "too-big", "no-dns-name"])
def test_a_register_whose_certificate_is_not_one_named_certificate_is_refused(
        pem: bytes) -> None:
    problem = agent_messages.register_problem(register(pem))
    assert problem is not None and problem.startswith("node_certificate"), problem


def test_a_registered_certificate_is_kept_re_encoded_with_its_name() -> None:
    made = node_certificate.generate()
    assert agent_messages.register_problem(register(made.certificate)) is None
    info = agent_messages.node_info(register(b"comment\n" + made.certificate).register)
    assert info.node_pin == types.NodePin(made.certificate, "synapse-agent")
    assert "BEGIN" not in repr(info)
    assert agent_messages.node_info(register(b"").register).node_pin is None
    # the pod's workers are sent what was accepted, nothing around it
    copy = agent_messages.as_decided(register(b"comment\n" + made.certificate), info)
    assert copy.register.node_certificate == made.certificate


async def test_connect_refuses_a_bad_certificate_invalid_argument() -> None:
    async with t.running(t.settings(), with_grpc=True) as cp:
        agent = Agent(cp.grpc_port)
        await agent.send(register(b"-----BEGIN CERTIFICATE-----\nnope\n"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await agent.receive()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node_certificate" in (err.value.details() or "")
        assert cp.services.registry.node("gpu-1") is None
        await agent.close()


# -- the registry's pin per address -------------------------------------------------------


def test_a_pin_belongs_to_its_nodes_address_and_a_new_register_replaces_it() -> None:
    svc = services_mod.build(t.settings())
    reg = svc.registry
    first, again, other = (node_certificate.generate() for _ in range(3))
    stream = reg.register(agent_messages.node_info(register(first.certificate).register))
    reg.register(agent_messages.node_info(
        register(other.certificate, "gpu-2", "127.0.0.1:2").register))
    assert reg.node_pin_at("127.0.0.1:1") == pin(first)
    assert reg.node_pin_at("127.0.0.1:2") == pin(other)
    assert reg.node_pin_at("127.0.0.1:3") is None
    reg.disconnect("gpu-1", stream)     # the agent restarts: a new stream, a new pin
    stream = reg.register(agent_messages.node_info(register(again.certificate).register))
    assert reg.node_pin_at("127.0.0.1:1") == pin(again)
    reg.disconnect("gpu-1", stream)     # ... and once more, now without one
    reg.register(agent_messages.node_info(register(b"").register))
    assert reg.node_pin_at("127.0.0.1:1") is None


def test_the_key_and_the_pin_at_an_address_are_one_nodes() -> None:
    """A node down kept its key at its address while a live node there brought only a
    certificate: calls trusted the live node's certificate and presented the other's key."""
    reg = services_mod.build(t.settings()).registry
    x, y = node_certificate.generate(), node_certificate.generate()
    stream = reg.register(types.NodeInfo("x", "10.0.0.5:50051", node_key="KEY-OF-X",
                                         node_pin=pin(x)))
    reg.disconnect("x", stream)                  # x goes down: y takes its address
    reg.register(types.NodeInfo("y", "10.0.0.5:50051", node_key=None, node_pin=pin(y)))
    assert reg.node_pin_at("10.0.0.5:50051") == pin(y)
    assert reg.node_key_at("10.0.0.5:50051") is None


async def test_the_pods_workers_pin_what_the_primary_accepted(tmp_path: pathlib.Path) -> None:
    sock = tmp_path / "grpc-1.sock"
    made = node_certificate.generate()
    svc = services_mod.build(t.settings())
    relay = agent_relay.AgentRelay([str(sock)], None)
    server, port = await grpc_server.start("127.0.0.1", 0,
                                           [grpc_server.control_plane(svc, relay)])
    try:
        async with worker(sock) as w:
            agent = Agent(port)
            await agent.send(register(b"before the block\n" + made.certificate))
            await harness.until(lambda: w.registry.node("gpu-1") is not None, 10,
                                "the worker's registry")
            assert w.registry.node_pin_at("127.0.0.1:1") == pin(made)
            assert svc.registry.node_pin_at("127.0.0.1:1") == pin(made)
            await agent.close()
    finally:
        await server.stop(0)


# -- Node calls ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def node(made: node_certificate.NodeCertificate | None, port: int = 0,
               ) -> AsyncIterator[tuple[str, list[str]]]:
    """An agent's Node server on loopback serving ``made`` (plain text for None); its
    address and the codes of the Node calls it saw."""
    seen: list[str] = []
    server = node_service.NodeServer(
        None, "127.0.0.1", port or harness.free_port(), token=KEY,
        observe_scores=lambda code, seconds: seen.append(code),
        tls_pair=made.server_pair() if made else None)
    await server.start(embedder_ready=False)
    try:
        yield f"127.0.0.1:{server.port}", seen
    finally:
        await server.stop(0)


async def reaches(client: node_embed.NodeEmbedClient, address: str) -> bool:
    """Whether a ScorePairs call gets to the agent (it has no scorer: NoScorer)."""
    try:
        await client.score_pairs(address, "q", ["c"], 5.0, "acme")
    except node_embed.NoScorer:
        return True
    except node_embed.EmbedError as exc:
        assert exc.code == "UNAVAILABLE", exc
        return False
    raise AssertionError("an agent without a scorer scored")


async def test_calls_trust_the_pinned_certificate_alone() -> None:
    made, stand_in = node_certificate.generate(), node_certificate.generate()
    async with node(made) as (address, seen):
        pins: dict[str, types.NodePin] = {address: pin(stand_in)}
        client = node_embed.NodeEmbedClient(key_of=lambda a: KEY, pin_of=pins.get)
        # a certificate another key made, at this address: no call gets through
        assert not await reaches(client, address)
        assert seen == []
        pins[address] = pin(made)
        assert await reaches(client, address)
        assert seen == ["FAILED_PRECONDITION"]
        # a pin never replaces a CA (here one that signed nothing this agent serves):
        # holders of the agent token could otherwise bring certificates of their own
        ca = node_embed.Credentials(stand_in.certificate, "synapse-agent")
        with_ca = node_embed.NodeEmbedClient(key_of=lambda a: KEY, pin_of=pins.get,
                                             credentials=ca)
        assert not await reaches(with_ca, address)
        # and a pin is not offered at another address
        async with node(made) as (elsewhere, _):
            assert not await reaches(client, elsewhere)
        await client.close()
        await with_ca.close()


async def test_an_agent_restarted_with_a_new_certificate_is_dialled_with_the_new_pin() -> None:
    before, after = node_certificate.generate(), node_certificate.generate()
    port = harness.free_port()
    pins: dict[str, types.NodePin] = {}
    client = node_embed.NodeEmbedClient(key_of=lambda a: KEY, pin_of=pins.get)
    async with node(before, port) as (address, _):
        pins[address] = pin(before)
        assert await reaches(client, address)
    async with node(after, port) as (address, seen):
        assert not await reaches(client, address)     # the old pin: refused
        pins[address] = pin(after)                    # the agent registered again
        assert await reaches(client, address)
        assert seen == ["FAILED_PRECONDITION"]
    await client.close()
    await asyncio.sleep(0)


async def test_node_tls_required_calls_no_agent_in_plain_text() -> None:
    made = node_certificate.generate()
    async with node(None) as (plain, seen), node(made) as (tls, _):
        pins = {tls: pin(made)}
        client = node_embed.NodeEmbedClient(key_of=lambda a: KEY, pin_of=pins.get,
                                            plain_text=False)
        with pytest.raises(node_embed.EmbedError, match="node_tls_required"):
            await client.score_pairs(plain, "q", ["c"], 5.0, "acme")
        assert seen == []
        assert await reaches(client, tls)
        await client.close()
        allowed = node_embed.NodeEmbedClient(key_of=lambda a: KEY, pin_of=pins.get)
        assert await reaches(allowed, plain)          # the default: today's rule
        await allowed.close()
