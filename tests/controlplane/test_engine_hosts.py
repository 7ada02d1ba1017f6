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
    ("http://[::1]:8000", "::1"),                      # an agent on IPv6 loopback
    ("http://127.0.0.1:8000", "::1"),
    ("http://[::1%25lo]:8000", "127.0.0.1"),           # a zone id (RFC 6874)
    ("http://[fd00::5%25eth0]:8000", "fd00::5%eth0"),
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
    ("http://10.0.0.5%.evil.example:8000", "10.0.0.5"),  # a name, not 10.0.0.5
    ("http://10.0.0.5%25eth0:8000", "10.0.0.5"),         # no zone id on IPv4
    ("http://[fd00::5%]:8000", "fd00::5"),
    ("http://[fd00::5%25a/b]:8000", "fd00::5"),
    ("http://127.0.0.1%.evil.example:8000", "127.0.0.1"),
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


@pytest.mark.parametrize("host", [
    "[64:ff9b::a9fe:a9fe]",     # NAT64 (RFC 6052) of 169.254.169.254
    "[64:ff9b::169.254.169.254]",
    "[2002:a9fe:a9fe::1]",      # 6to4
    "[::a9fe:a9fe]",            # IPv4-compatible
    "[::ffff:0:a9fe:a9fe]",     # SIIT
    "[::ffff:a9fe:a9fe]",       # mapped
    "[64:ff9b::e000:1]",        # 224.0.0.1, multicast
    "[2002::1]",                # 0.0.0.0, unspecified
])
def test_ipv6_forms_carrying_the_metadata_service_are_refused_whatever_is_listed(
        host: str) -> None:
    """A gateway reaches the IPv4 address such an IPv6 address carries: ``::/0`` no more
    opens the metadata service in these spellings than ``0.0.0.0/0`` does in its own."""
    allowed = engine_hosts.Allowed.parse(["0.0.0.0/0", "::/0"])
    why = engine_hosts.refusal(f"http://{host}:80/", "10.0.0.5", allowed)
    assert why is not None and "link-local, unspecified or multicast" in why


def test_ipv6_forms_carrying_an_allowed_ipv4_address_pass_where_listed() -> None:
    anywhere = engine_hosts.Allowed.parse(["::/0"])
    for host in ("[64:ff9b::a00:9]", "[2002:a00:9::1]", "[::1]"):
        assert engine_hosts.refusal(f"http://{host}:8000/", "10.0.0.5", anywhere) is None
    explicit = engine_hosts.Allowed.parse(["169.254.10.0/24", "::/0"])
    assert engine_hosts.refusal("http://[64:ff9b::a9fe:a05]/", "10.0.0.5", explicit) is None
    assert engine_hosts.refusal("http://[64:ff9b::a9fe:a9fe]/", "10.0.0.5",
                                explicit) is not None


@pytest.mark.parametrize("entry", ["", "http://x", "a b", "10.0.0.0/33", "x/y"])
def test_an_entry_that_is_no_host_is_a_config_error(entry: str) -> None:
    with pytest.raises(ValueError, match="IP address, a CIDR network or a host name"):
        engine_hosts.Allowed.parse([entry])
