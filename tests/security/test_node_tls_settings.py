"""The settings of the agent link's TLS say what is wrong before anything listens or dials:
half a certificate pair on the agent's Node port, a server name without the CA that
turns TLS on, and files that hold no certificate (which grpc itself would only notice at
the first handshake, as a failed Node call).
"""

from __future__ import annotations

import pathlib

import pytest

from agent import config as agent_config
from agent import node_service
from controlplane import config as cp_config
from controlplane import main as cp_main
from controlplane.adapters import node_embed
from synapse_common import settings
from tests import harness
from tests.security import test_node_tls as certs


@pytest.mark.parametrize(("given", "missing"), [("tls_cert_file", "tls_key_file"),
                                                ("tls_key_file", "tls_cert_file")])
def test_the_agents_node_port_needs_both_halves_of_the_pair(given: str, missing: str) -> None:
    with pytest.raises(settings.ConfigError) as info:
        settings.validate(agent_config.AgentSettings, {"grpc": {given: "/etc/tls/x.pem"}})
    assert f"grpc: {missing}: required with {given}" in str(info.value)


def test_a_node_server_name_without_the_ca_is_refused() -> None:
    with pytest.raises(settings.ConfigError) as info:
        settings.validate(cp_config.ControlPlaneSettings,
                          {"grpc": {"node_server_name": "synapse-agent"}})
    assert "grpc: node_ca_file: required with node_server_name" in str(info.value)


def test_node_calls_stay_plain_text_only_without_a_ca() -> None:
    plain = settings.validate(cp_config.ControlPlaneSettings, {})
    assert node_embed.Credentials.load(plain.grpc.node_ca_file,
                                       plain.grpc.node_server_name) is None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("node-tls-pki")
    ca = certs.make_ca(tmp, "ca")
    cert, key = certs.make_leaf(tmp, "agent", certs.SERVER_NAME, ca)
    _, other_key = certs.make_leaf(tmp, "other", "other", ca)
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {"ca": str(ca[0]), "cert": cert, "key": key, "other_key": other_key,
            "garbage": str(garbage), "missing": str(tmp / "absent.pem")}


@pytest.mark.parametrize("bad", ["garbage", "missing"])
def test_a_node_ca_file_without_a_certificate_stops_the_control_plane(
        pki: dict[str, str], bad: str) -> None:
    cfg = settings.validate(cp_config.ControlPlaneSettings,
                            {"grpc": {"node_ca_file": pki[bad]}})
    with pytest.raises(ValueError, match=r"^grpc\.node_ca_file: cannot load"):
        cp_main.check_tls_files(cfg)
    good = settings.validate(cp_config.ControlPlaneSettings,
                             {"grpc": {"node_ca_file": pki["ca"],
                                       "node_server_name": certs.SERVER_NAME}})
    cp_main.check_tls_files(good)
    loaded = node_embed.Credentials.load(good.grpc.node_ca_file, good.grpc.node_server_name)
    assert loaded is not None and loaded.server_name == certs.SERVER_NAME
    assert loaded.root_certificates == pathlib.Path(pki["ca"]).read_bytes()


@pytest.mark.parametrize(("cert", "key"), [("cert", "other_key"), ("garbage", "key"),
                                           ("missing", "key")])
async def test_a_node_port_pair_that_does_not_load_stops_the_agent(
        pki: dict[str, str], cert: str, key: str) -> None:
    with pytest.raises(OSError, match=r"^grpc\.tls_cert_file / grpc\.tls_key_file: cannot load"):
        node_service.NodeServer(None, "127.0.0.1", harness.free_port(),
                                tls_cert_file=pki[cert], tls_key_file=pki[key])


async def test_a_good_pair_makes_a_tls_only_node_port(pki: dict[str, str]) -> None:
    server = node_service.NodeServer(None, "127.0.0.1", 0, tls_cert_file=pki["cert"],
                                     tls_key_file=pki["key"])
    assert server.tls and server.port
    plain = node_service.NodeServer(None, "127.0.0.1", 0)
    assert not plain.tls
