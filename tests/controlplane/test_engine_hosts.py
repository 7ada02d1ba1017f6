"""Where a node's reported backends may be (``controlplane.core.engine_hosts``): at the
node's own address as the control plane sees it, loopback for an agent on this host, or
where ``registry.engine_hosts`` allows; never the metadata service by default."""

from __future__ import annotations

import pytest

from controlplane.core import engine_hosts

NONE = engine_hosts.Allowed()


@pytest.mark.parametrize(("url", "peer"), [
    ("http://10.0.0.5:8000", "10.0.0.5"),              # the chart's POD_IP engines
    ("http://10.0.0.5:8000/v1", "::ffff:10.0.0.5"),    # a dual-stack socket
    ("https://[fd00::5]:8000", "fd00::5"),
    ("http://127.0.0.1:8000", "127.0.0.1"),            # synapse up, make up
    ("http://127.0.1.1:8000", "127.0.0.1"),            # node_ip() on Debian, same host
    ("http://localhost:8000", "127.0.0.1"),
    ("http://[::1]:8000", "unix:/run/synapse/grpc.sock"),
])
def test_a_nodes_own_engines_are_taken(url: str, peer: str) -> None:
    assert engine_hosts.refusal(url, peer, NONE) is None


@pytest.mark.parametrize(("url", "peer"), [
    ("http://10.0.0.6:8000", "10.0.0.5"),              # another node's engine
    ("http://127.0.0.1:9999", "10.0.0.5"),             # the control plane's own host
    ("http://127.1:9999", "10.0.0.5"),
    ("http://0x7f.1:9999", "10.0.0.5"),
    ("http://[::ffff:127.0.0.1]:9999", "10.0.0.5"),
    ("http://localhost:9999", "10.0.0.5"),
    ("http://169.254.169.254/latest", "10.0.0.5"),     # the cloud metadata service
    ("http://169.254.169.254/latest", "169.254.169.254"),
    ("http://[fe80::1]:80", "10.0.0.5"),
    ("http://0.0.0.0:8000", "127.0.0.1"),
    ("http://redis.default.svc:6379", "10.0.0.5"),     # a name is not resolved
    ("http://10.0.0.5@127.0.0.1:9999", "10.0.0.5"),    # userinfo is not the host
    ("file:///etc/passwd", "10.0.0.5"),
    ("http://10.0.0.5:port", "10.0.0.5"),
])
def test_a_backend_elsewhere_is_refused(url: str, peer: str) -> None:
    why = engine_hosts.refusal(url, peer, NONE)
    assert why is not None and "@" not in why


def test_the_operator_allows_more_hosts_but_not_the_metadata_service_by_accident() -> None:
    allowed = engine_hosts.Allowed.parse(["10.0.0.0/8", "vllm.models.svc", "0.0.0.0/0",
                                          "::/0"])
    assert engine_hosts.refusal("http://10.9.9.9:8000", "10.0.0.5", allowed) is None
    assert engine_hosts.refusal("http://VLLM.models.svc.:8000", "10.0.0.5", allowed) is None
    assert engine_hosts.refusal("http://169.254.169.254/", "10.0.0.5", allowed) is not None
    assert engine_hosts.refusal("http://[fe80::1]/", "10.0.0.5", allowed) is not None
    explicit = engine_hosts.Allowed.parse(["169.254.10.0/24"])
    assert engine_hosts.refusal("http://169.254.10.5:8000", "10.0.0.5", explicit) is None
    assert engine_hosts.refusal("http://169.254.169.254/", "10.0.0.5", explicit) is not None


@pytest.mark.parametrize("entry", ["", "http://x", "a b", "10.0.0.0/33", "x/y"])
def test_an_entry_that_is_no_host_is_a_config_error(entry: str) -> None:
    with pytest.raises(ValueError, match="IP address, a CIDR network or a host name"):
        engine_hosts.Allowed.parse([entry])
