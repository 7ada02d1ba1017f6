"""Which hosts a backend an agent reports, and its Node service, may be at.

A registered node is sent the prompts of every tenant asking for a model it reports, and
the control plane probes, scrapes and reads the documents of every URL it reports; it
sends tenants' texts to the Node-service address it registered (``Node.Embed``,
``ScorePairs``). Every node holds the shared agent token, so one compromised node could
name any address: another node's engine or Node service (taking its traffic), an
internal service, the cloud's metadata service. So the host of a reported backend URL
(:func:`refusal`) and of ``Register.node_address`` (:func:`address_refusal`), one rule
(:func:`host_refusal`), must be, as the transport would dial it (:func:`canonical`:
``127.1``, ``0x7f.1`` and an IPv4-mapped IPv6 address are the IPv4 address they mean,
``localhost`` is ``127.0.0.1``):

* the node's own address as the control plane sees it: the peer address of its stream
  (what a node's engines advertise: the chart's ``POD_IP``, the node IP of an agent with
  ``engine_host: 0.0.0.0``), or any loopback address when the stream itself comes from
  this host (a loopback peer, or a unix socket: ``synapse up`` and ``make up``, whose
  engines listen on ``127.0.0.1``);
* or one the operator allows (``registry.engine_hosts``: IP addresses, CIDR networks and
  host names, compared exactly): an ``engine: external`` backend on another machine, an
  agent that reaches the control plane through a NAT or a proxy;
* never a link-local address (``169.254.0.0/16``, the cloud metadata service's, and
  ``fe80::/10``), an unspecified (``0.0.0.0``) or a multicast one, unless an entry of
  ``engine_hosts`` is itself inside that range (``0.0.0.0/0`` does not open them); an
  IPv6 address that carries an IPv4 address (NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``,
  IPv4-compatible: :func:`media_urls.carried_ipv4`), which a gateway reaches for it, is
  judged by that IPv4 address (``::/0`` does not open the metadata service's).

A host holding ``%`` is refused unless it is an IPv6 literal with a zone id
(``[fe80::1%eth0]``, judged without it): ``10.0.0.5%.evil.example`` is a name.

An agent on this host that registered an engine port range
(``supervisor.engine_port_range``) has its loopback backends there: one at another port
of this host is refused (the control plane's own Redis, admin or metrics port is none of
its engines), unless ``registry.engine_hosts`` lists that loopback address itself. The
range is the ports its engines listen on, the static ones included, as a NetworkPolicy
opening the range demands of a remote node's.

A name other than ``localhost`` is not resolved here (the transport resolves it later,
perhaps to another address): it passes only when listed by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket
import urllib.parse
from collections.abc import Iterable

from controlplane.core import media_urls

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
# what an IPv6 zone id may hold (RFC 6874: unreserved characters, such as ``eth0``)
_ZONE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._~")


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What ``registry.engine_hosts`` allows beyond a node's own address."""

    networks: tuple[Network, ...] = ()
    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowed:
        """``entries``: IP addresses, CIDR networks or host names; ValueError naming
        the entry that is none of them."""
        networks: list[Network] = []
        names: set[str] = set()
        for entry in entries:
            text = entry.strip().strip("[]").rstrip(".").lower()
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            if not text or "/" in text or not all(
                    part and part.replace("-", "").replace("_", "").isalnum()
                    for part in text.split(".")):
                raise ValueError(f"{entry!r} is not an IP address, a CIDR network or a "
                                 "host name")
            names.add(text)
        return cls(tuple(networks), frozenset(names))

    def covers(self, address: Address, explicitly: bool) -> bool:
        """Whether a listed network holds ``address``; ``explicitly``: only one that is
        itself inside a range refused by default."""
        for net in self.networks:
            if net.version != address.version or address not in net:
                continue
            if not explicitly or any(net.version == r.version and net.subnet_of(r)  # type: ignore[arg-type]
                                     for r in _LINK_LOCAL):
                return True
        return False


def canonical(host: str) -> Address | str:
    """``host`` as the transport dials it: an IP address (IPv4 shorthand, an IPv4-mapped
    IPv6 address and ``localhost`` as the IPv4 address they mean; an IPv6 literal without
    its zone id), else the lower-cased name without a trailing dot. A ``%`` anywhere but
    before the zone id of an IPv6 literal leaves the host a name holding ``%``, which no
    ``registry.engine_hosts`` entry can list: ``10.0.0.5%.evil.example`` is no
    ``10.0.0.5`` (a resolver may take it for a name, or a transport cut it elsewhere)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return ipaddress.IPv4Address("127.0.0.1")
    address, percent, zone = host.partition("%")
    if percent and not (zone and _ZONE_CHARS.issuperset(zone) and ":" in address):
        return host
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if host and all(part.isalnum() for part in host.split(".")):
            with contextlib.suppress(OSError):
                return ipaddress.IPv4Address(socket.inet_aton(host))   # 127.1, 0x7f.1
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def refusal(url: str, peer: str, allowed: Allowed,
            ports: tuple[int, int] | None = None) -> str | None:
    """Why a backend reported at ``url`` over a stream from ``peer`` (the peer's host:
    an IP address, or ``unix:…`` for a unix socket) is refused (None: it is not); the
    text names the URL's host, never the rest of the URL (it may carry credentials).
    ``ports``: the engine port range the agent registered, which a loopback backend of an
    agent on this host must lie in (see :func:`host_refusal`)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        port = parts.port if parts.port is not None else (
            443 if parts.scheme == "https" else 80)
    except ValueError:
        return "a backend URL that is not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return "a backend URL that is not http(s)://host"
    return host_refusal("a backend", host, port, peer, allowed, ports)


def address_refusal(address: str, peer: str, allowed: Allowed) -> str | None:
    """Why a node's Node-service address (``Register.node_address``, ``host:port``, its
    form already checked) is refused over a stream from ``peer`` (None: it is not): the
    control plane sends tenants' texts there (``Node.Embed``, ``ScorePairs``), so it must
    be where a backend of that node may be. No port range: it is not an engine's port."""
    host, _, port = address.rpartition(":")
    return host_refusal("a Node-service address", host, int(port), peer, allowed, None)


def host_refusal(what: str, host: str, port: int, peer: str, allowed: Allowed,
                 ports: tuple[int, int] | None) -> str | None:
    """Why ``what`` at ``host`` (``port``) is refused over a stream from ``peer`` (the
    module docstring's rule). ``ports``: for an agent on this host, the engine port range
    it registered: a loopback ``host`` outside it is refused (whatever listens on this
    host, the control plane's own Redis or admin port, is no engine of the agent's),
    unless ``registry.engine_hosts`` lists that loopback address."""
    where = canonical(host)
    if isinstance(where, str):
        if where in allowed.names:
            return None
        return (f"{what} at host {where!r}, a name registry.engine_hosts does not list "
                f"({what} must be at the node's own address)")
    carried = (media_urls.carried_ipv4(where)
               if isinstance(where, ipaddress.IPv6Address) else None)
    judged = where if carried is None else carried
    if judged.is_link_local or judged.is_unspecified or judged.is_multicast:
        if allowed.covers(judged, explicitly=True):
            return None
        shown = where if carried is None else f"{where} (which carries {carried})"
        return (f"{what} at {shown}, a link-local, unspecified or multicast address "
                "(allowed only when registry.engine_hosts lists a range inside it)")
    if allowed.covers(where, False):
        return None
    seen_from = canonical(peer) if not peer.startswith("unix") else None
    local = seen_from is None or (not isinstance(seen_from, str) and seen_from.is_loopback)
    if local and where.is_loopback:
        if ports is not None and not ports[0] <= port <= ports[1]:
            return (f"{what} at {where} port {port}, outside the engine port range "
                    f"{ports[0]}-{ports[1]} its agent registered")
        return None
    if where == seen_from:
        return None
    return (f"{what} at {where}, which is not the node's own address as the control "
            f"plane sees it ({seen_from or 'this host'}) nor in registry.engine_hosts")
