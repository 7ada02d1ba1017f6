"""A gRPC server's certificate renewed in place is served from the next connection on
(the agents' Node port here; the control plane's gRPC port wraps the same pair),
with no restart; a renewal caught half written keeps the certificate loaded before."""

from __future__ import annotations

import logging
import pathlib
import shutil

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent import node_service
from synapse_common import tls_files
from tests import fleet


async def _serving(address: str, ca: bytes) -> bool:
    """Whether a new connection trusting only ``ca`` gets an answer."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(address, credentials) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def pairs(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Two self-signed pairs, and the files a server reads (the old pair to begin with)."""
    out: dict[str, pathlib.Path] = {}
    for name in ("old", "new"):
        folder = tmp_path / name
        folder.mkdir()
        cert, key = fleet.self_signed_cert(folder)
        out[f"{name}_cert"], out[f"{name}_key"] = pathlib.Path(cert), pathlib.Path(key)
    out["cert"], out["key"] = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(out["old_cert"], out["cert"])
    shutil.copy(out["old_key"], out["key"])
    return out


def _read(path: pathlib.Path) -> bytes:
    return path.read_bytes()


async def test_a_renewed_certificate_is_served_to_new_connections(
        pairs: dict[str, pathlib.Path], caplog: pytest.LogCaptureFixture) -> None:
    cert, key = pairs["cert"], pairs["key"]
    old_ca, new_ca = _read(pairs["old_cert"]), _read(pairs["new_cert"])
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", node_service.server_credentials(str(cert),
                                                                                 str(key)))
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        assert await _serving(address, old_ca)
        assert not await _serving(address, new_ca)

        # half written: the new certificate beside the old key: the old pair stays
        shutil.copy(pairs["new_cert"], cert)
        with caplog.at_level(logging.WARNING, "synapse_common.tls_files"):
            assert await _serving(address, old_ca)
            assert await _serving(address, old_ca)
        assert caplog.text.count("keeping the TLS certificate loaded before") == 1

        shutil.copy(pairs["new_key"], key)   # the renewal completes
        assert await _serving(address, new_ca)
        assert not await _serving(address, old_ca)
    finally:
        await server.stop(0)


def test_a_pair_that_does_not_load_names_the_setting(pairs: dict[str, pathlib.Path]) -> None:
    with pytest.raises(OSError, match=r"grpc\.tls_cert_file: cannot load"):
        tls_files.FollowedPair(str(pairs["old_cert"]), str(pairs["new_key"]),
                               "grpc.tls_cert_file")
