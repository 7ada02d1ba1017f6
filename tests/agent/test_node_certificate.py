"""The Node service's self-signed certificate (agent.node_certificate, grpc.tls_self_signed):
what it is, that a real agent serves it, sends it in Register and keeps its key off disk
and out of its output, and that it cannot be combined with certificate files."""

from __future__ import annotations

import datetime
import pathlib

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import node_certificate
from agent.config import AgentSettings
from synapse_common import settings
from tests import harness
from tests.agent.conftest import agent_config


def test_a_new_ec_key_and_a_certificate_for_the_fixed_name_that_is_no_ca() -> None:
    now = datetime.datetime.now(datetime.UTC)
    made = node_certificate.generate(now)
    cert = x509.load_pem_x509_certificate(made.certificate)
    key = serialization.load_pem_private_key(made.key, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    assert cert.issuer == cert.subject              # self-signed
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["synapse-agent"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # valid now (for a control plane a little behind too) and for years to come
    assert cert.not_valid_before_utc < now - datetime.timedelta(minutes=30)
    assert cert.not_valid_after_utc > now + datetime.timedelta(days=9 * 365)
    # the key never shows in a repr (logs, tracebacks)
    assert b"PRIVATE KEY" in made.key and "PRIVATE" not in repr(made)
    assert node_certificate.generate().certificate != made.certificate


def test_tls_self_signed_is_exclusive_with_certificate_files() -> None:
    with pytest.raises(settings.ConfigError) as info:
        settings.validate(AgentSettings, {"grpc": {
            "tls_self_signed": True, "tls_cert_file": "/etc/tls/tls.crt",
            "tls_key_file": "/etc/tls/tls.key"}})
    assert "grpc: tls_self_signed: exclusive with tls_cert_file / tls_key_file" in str(
        info.value)


def _health(address: str, root: bytes | None) -> bool:
    """Whether the agent's health service answers over TLS trusting ``root`` alone (over
    plain text when None)."""
    channel = (grpc.insecure_channel(address) if root is None else grpc.secure_channel(
        address, grpc.ssl_channel_credentials(root),
        options=(("grpc.ssl_target_name_override", node_certificate.NAME),)))
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=5)
        except grpc.RpcError:
            return False
    return True


def test_the_agent_serves_the_certificate_it_registers_and_keeps_its_key_in_memory(
        tmp_path: pathlib.Path, control_plane, start_agent) -> None:
    cfg = agent_config(tmp_path, control_plane, grpc={"tls_self_signed": True})
    agent = start_agent(cfg)
    harness.wait_until(lambda: control_plane.recorder.registers(), 30, "a Register",
                       proc=agent.proc)
    (register, *_) = control_plane.recorder.registers()
    pem = register.node_certificate
    assert x509.load_pem_x509_certificate(pem).subject.rfc4514_string() == "CN=synapse-agent"
    assert _health(agent.grpc_address, pem)
    assert not _health(agent.grpc_address, None)            # TLS alone on the port
    assert not _health(agent.grpc_address, node_certificate.generate().certificate)
    assert "PRIVATE KEY" not in agent.proc.output()
    # the log names the certificate it serves, so an operator can match it
    fingerprint = x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()
    assert f"sha256 {fingerprint}" in agent.proc.output()
    # its link to the control plane is plain text here: the pin could be swapped on it
    assert "grpc.tls_self_signed without control_plane.tls_ca_file" in agent.proc.output()
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"PRIVATE KEY" not in path.read_bytes(), path
