"""The registry: nodes and backends from agent streams, plus static upstreams.

Decisions:

* A node is ``down`` once ``down_after_s`` passes without a report, or at once when its
  stream closes (no report can arrive on a closed stream; a reconnecting agent registers
  again within its backoff). Down is computed from the injected clock when asked, so no
  timer task is needed and tests move time by hand.
* Only READY backends of a node that is up, not cordoned and not draining are routable;
  static upstreams are routable while their last health probe passed.
* Each node has an outbox of commands. ``send_command`` queues one and waits for the
  agent's ``CommandAck``; the Connect servicer drains the outbox onto the stream. A
  stream that closes fails the waiting commands, so an Admin call never hangs on a
  vanished agent.
* ``version`` changes whenever the routable set may have changed, for cheap caching.
* A node name has one live stream: a Register for a node that is up (connected, and it
  reported within ``down_after_s``) is refused with :class:`NodeLive`, so whoever else
  can register cannot take over a live node's name, address and traffic; the node's own
  agent, reconnecting after its old stream died unnoticed, is let in once that stream has
  been silent for ``down_after_s``.
* A Node-service address belongs to one node that is up (:class:`AddressTaken`): whoever
  registers another node cannot make the control plane call a live node's agent with
  the wrong key (and so fail that agent's embeddings).
* At most ``max_nodes`` names: a new one past it first forgets nodes whose streams
  closed and that were down for ``forget_down_after_s``, then, if none is, the one whose stream closed longest ago
  among those that never *served* and carry no operator intent (no cordon, no commanded
  drain), else is refused with :class:`TooManyNodes` (a registrant inventing names must
  not grow the registry without bound). A node has served once its reports named a
  backend over at least ``down_after_s`` (a running agent reports every few seconds):
  such a name, or one an operator cordoned or drained, matters to operators and stays
  for ``forget_down_after_s``. The others lose nothing when forgotten (no backends that
  ran, no intent; a command waiting on one failed when its stream closed) and register
  again as new. So a holder of the shared agent token who invents names whose streams
  end at once cannot lock new nodes out: each new name takes the place of one such
  name. Only a node whose stream closed is forgotten this way, never one whose stream
  is still open, silent or not: its next report would find no node.
* What would still fill the registry is names that stay connected (a live stream each)
  or that reported backends for ``down_after_s`` each. So the nodes that hold a place
  (not spare, not down for ``forget_down_after_s``) registered from one *origin* (the
  caller's address, as :meth:`Registry.register` is told it) are at most
  ``max_nodes_per_origin``: one more new name from there is refused with
  :class:`OriginFull`, and the rest of the registry stays for nodes elsewhere. A node
  registering again from its origin takes no second place. No origin (the caller's
  choice: this host, a decided copy) is not counted.
* A serving worker takes its primary's decisions (``decided``) past ``max_nodes`` too,
  but first makes room the same way, so its copy stays bounded while its primary's is.
* What a backend's own ``/openapi.json`` said of ``cache_salt`` (a kind-less static
  upstream, an agent's ``external`` backend: ``core.cache_salt.learns``) is set from
  outside (``set_static_salted``, ``set_agent_salted``); an agent's backend keeps it
  across reports while it reports the URL the document was read at.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import itertools
import socket
import uuid
from collections.abc import Iterable

from controlplane.core import types
from synapse_common import clock as clocks

_ids = itertools.count(1)
VIEW_TTL_S = 0.1
_PREFIX = uuid.uuid4().hex[:8]


@dataclasses.dataclass
class _Node:
    info: types.NodeInfo
    last_seen: float
    connected: bool = True
    cordoned: bool = False
    commanded_drain: bool = False
    agent_draining: bool = False
    backends: tuple[types.BackendState, ...] = ()
    report: object = None
    stream_id: int = 0
    # when a report first named a backend, and whether reports named them for
    # down_after_s since (the node served: never forgotten merely to make room)
    backends_since: float | None = None
    served: bool = False
    origin: str | None = None       # where its newest stream came from (None: not counted)
    # backend name -> the URL at which its own /openapi.json showed cache_salt
    # (set_agent_salted), for the reports that follow
    salted: dict[str, str] = dataclasses.field(default_factory=dict)
    outbox: asyncio.Queue[tuple[str, types.Command]] = dataclasses.field(
        default_factory=asyncio.Queue)


class NodeLive(Exception):
    """A Register for a node whose current stream is live."""


class TooManyNodes(Exception):
    """A Register for a new node past ``max_nodes``."""


class OriginFull(Exception):
    """A Register for a new node from an origin holding ``max_nodes_per_origin`` nodes."""


class AddressTaken(Exception):
    """A Register naming the Node-service address of another node that is up."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def address_key(address: str) -> str:
    """``host:port`` as two spellings of one socket compare: the host lower-cased without
    a trailing dot, ``localhost`` as 127.0.0.1, an IP in its one canonical form (IPv4
    shorthand such as ``127.1``, an IPv4-mapped IPv6 address as its IPv4), the port as a
    number. Not resolved: two names of one host still differ."""
    host, sep, port = address.rpartition(":")
    try:
        number = int(port) if sep else None
    except ValueError:
        number = None
    if number is None:
        return address.lower()
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        host = str(ip)
    except ValueError:
        if host and all(part.isalnum() for part in host.split(".")):
            with contextlib.suppress(OSError):
                host = socket.inet_ntoa(socket.inet_aton(host))   # 127.1, 0x7f.1
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"


def _with_salt(node: _Node, backends: tuple[types.BackendState, ...],
               ) -> tuple[types.BackendState, ...]:
    """A report's ``backends``, those whose document showed ``cache_salt`` at the URL
    they report salted (:meth:`Registry.set_agent_salted`); what was learnt of a backend
    the report no longer names is forgotten (a report bounds what is kept)."""
    if not node.salted:
        return backends
    named = {b.name for b in backends}
    for name in [n for n in node.salted if n not in named]:
        del node.salted[name]
    return tuple(dataclasses.replace(b, takes_salt=True, shares_cache=False)
                 if node.salted.get(b.name) == b.url else b for b in backends)


def _spare(node: _Node) -> bool:
    """Whether ``node`` may be forgotten at once to make room: its stream closed, it never
    served, and no operator cordoned or drained it (see the module docstring)."""
    return not (node.connected or node.served or node.cordoned or node.commanded_drain)


class Registry:
    def __init__(self, clock: clocks.Clock, down_after_s: float, *, max_nodes: int = 1024,
                 forget_down_after_s: float = 3600.0,
                 max_nodes_per_origin: int | None = None) -> None:
        self._clock = clock
        self._down_after_s = down_after_s
        self._max_nodes = max_nodes
        self._max_per_origin = max_nodes_per_origin
        self._forget_down_after_s = forget_down_after_s
        # registry version -> address -> (node key, pin) of the node that address is now
        self._keys_at: tuple[int, dict[str, tuple[str | None, types.NodePin | None]]] \
            | None = None
        self._nodes: dict[str, _Node] = {}
        self._static: dict[str, types.BackendState] = {}
        self._static_healthy: dict[str, bool] = {}
        self._pending: dict[str, tuple[str, asyncio.Future[types.CommandResult]]] = {}
        self.version = 0
        self._view: tuple[int, float, list[tuple[types.BackendState, str]]] | None = None
        self._served: tuple[int, float, frozenset[str]] | None = None

    # -- agents -------------------------------------------------------------------------

    def register(self, info: types.NodeInfo, stream_id: int | None = None, *,
                 decided: bool = False, origin: str | None = None) -> int:
        """Record a node for a new stream, or refresh it for its own stream
        (``stream_id``); returns the stream id the caller must pass back. Raises
        :class:`NodeLive`, :class:`AddressTaken`, :class:`OriginFull` or
        :class:`TooManyNodes` (see the module docstring), unless ``decided``: a serving
        worker's copy of a stream its pod's primary accepted, whose registry decided
        already (a newer stream then takes the node over at once). ``origin``: where a
        new stream came from (None: not counted against ``max_nodes_per_origin``)."""
        node = self._nodes.get(info.name)
        if stream_id is not None and node is not None and node.stream_id == stream_id:
            if not decided:
                self._check_address(info)
            node.info, node.last_seen = info, self._clock()
            self.version += 1
            return stream_id
        if not decided:
            self._admit(info, node, origin)
        elif node is None:
            self._make_room()       # the primary decided: taken even where none is made
        stream_id = next(_ids)
        if node is None:
            self._nodes[info.name] = _Node(info=info, last_seen=self._clock(),
                                           stream_id=stream_id, origin=origin)
        else:
            # A re-registering agent keeps operator intent (cordon/drain) and its outbox.
            node.info, node.last_seen, node.connected = info, self._clock(), True
            node.stream_id, node.origin = stream_id, origin
        self.version += 1
        return stream_id

    def _admit(self, info: types.NodeInfo, node: _Node | None, origin: str | None) -> None:
        """Raise why a new stream for ``info`` may not register (see the module docstring)."""
        if node is not None and self.node_status(node) != "down":
            raise NodeLive(info.name)
        self._check_address(info)
        if origin is not None and self._max_per_origin is not None and (
                self._held_from(origin, info.name) >= self._max_per_origin):
            raise OriginFull(origin)
        if node is None and not self._make_room():
            raise TooManyNodes(info.name)

    def _make_room(self) -> bool:
        """Whether a new name fits, after forgetting nodes long down, else one never
        served whose stream closed (see the module docstring)."""
        if len(self._nodes) < self._max_nodes:
            return True
        self._forget_long_down()
        if len(self._nodes) < self._max_nodes:
            return True
        spare = [(n.last_seen, name) for name, n in self._nodes.items() if _spare(n)]
        if not spare:
            return False
        del self._nodes[min(spare)[1]]
        self.version += 1
        return True

    def _held_from(self, origin: str, but: str) -> int:
        """The nodes other than ``but`` registered from ``origin`` that hold a place: not
        spare, and not down long enough to be forgotten to make room."""
        now = self._clock()
        return sum(1 for name, n in self._nodes.items()
                   if n.origin == origin and name != but and not _spare(n)
                   and not self._long_down(n, now))

    def _address_taken(self, node: _Node) -> bool:
        """Whether another node that is up holds ``node``'s Node-service address."""
        try:
            self._check_address(node.info)
        except AddressTaken:
            return True
        return False

    def _check_address(self, info: types.NodeInfo) -> None:
        """One Node-service address, one node that is up: the control plane presents
        the key of the node that registered an address to whatever answers there."""
        if not info.address:
            return
        wanted = address_key(info.address)
        for name, other in self._nodes.items():
            if (name != info.name and address_key(other.info.address) == wanted
                    and self.node_status(other) != "down"):
                raise AddressTaken(name)

    def _long_down(self, node: _Node, now: float) -> bool:
        """Whether ``node`` may be forgotten to make room: its stream closed and it was
        last heard of over ``forget_down_after_s`` ago. One silent on an open stream is
        kept, however long: its next report must find it."""
        return not node.connected and now - node.last_seen > self._forget_down_after_s

    def _forget_long_down(self) -> None:
        now = self._clock()
        gone = [name for name, n in self._nodes.items() if self._long_down(n, now)]
        for name in gone:
            del self._nodes[name]
        if gone:
            self.version += 1

    def report(self, node_name: str, backends: Iterable[types.BackendState],
               draining: bool = False, details: object = None,
               stream_id: int | None = None) -> bool:
        """Apply a report; False (nothing applied: the caller ends the stream) when it came
        on ``stream_id`` and a newer stream of the node took over since, or when the node
        was down (silent) and another node that is up took its address meanwhile: two
        nodes up at one address would share its key and pin."""
        node = self._nodes.get(node_name)
        if node is None:
            raise KeyError(node_name)
        if stream_id is not None and node.stream_id != stream_id:
            return False
        if self.node_status(node) == "down" and self._address_taken(node):
            return False    # it fell silent, and another node took its address meanwhile
        node.backends = _with_salt(node, tuple(backends))
        node.agent_draining = draining
        node.last_seen = self._clock()
        if node.backends:
            since = node.backends_since
            if since is None:
                node.backends_since = node.last_seen
            elif node.last_seen - since >= self._down_after_s:
                node.served = True
        node.connected = True
        node.report = details
        self.version += 1
        return True

    def disconnect(self, node_name: str, stream_id: int) -> None:
        """The node's stream closed; a newer stream of the same node is left alone."""
        node = self._nodes.get(node_name)
        if node is None or node.stream_id != stream_id:
            return
        node.connected = False
        self.version += 1
        for cid, (name, fut) in list(self._pending.items()):
            if name == node_name and not fut.done():
                fut.set_result(types.CommandResult(False, "node disconnected"))
                del self._pending[cid]

    def set_agent_salted(self, node_name: str, name: str, url: str, takes: bool,
                         shares: bool) -> None:
        """What an agent's backend's own document, read at ``url``, said
        (``core.cache_salt.learns``): whether it ``takes`` ``cache_salt``, and, when it
        does not, whether tenants then ``shares`` its prefix cache. Kept for the node's
        next reports while they name the backend at that URL: another URL may be another
        server (the reports' own marks say whether tenants share it)."""
        node = self._nodes.get(node_name)
        if node is None:
            return
        if takes:
            node.salted[name] = url
        else:
            node.salted.pop(name, None)
        marks = (takes, shares and not takes)
        if any(b.name == name and b.url == url and (b.takes_salt, b.shares_cache) != marks
               for b in node.backends):
            node.backends = tuple(
                dataclasses.replace(b, takes_salt=marks[0], shares_cache=marks[1])
                if b.name == name and b.url == url else b for b in node.backends)
            self.version += 1

    def forget(self, node_name: str) -> bool:
        self.version += 1
        return self._nodes.pop(node_name, None) is not None

    # -- operator intent ----------------------------------------------------------------

    def cordon(self, node_name: str, cordoned: bool = True) -> None:
        self._require(node_name).cordoned = cordoned
        self.version += 1

    def set_drain(self, node_name: str, draining: bool) -> None:
        self._require(node_name).commanded_drain = draining
        self.version += 1

    def _require(self, node_name: str) -> _Node:
        node = self._nodes.get(node_name)
        if node is None:
            raise KeyError(node_name)
        return node

    # -- commands -----------------------------------------------------------------------

    def current(self, node_name: str, stream_id: int) -> bool:
        """Whether ``stream_id`` is the node's newest stream."""
        node = self._nodes.get(node_name)
        return node is not None and node.stream_id == stream_id

    def outbox(self, node_name: str) -> asyncio.Queue[tuple[str, types.Command]]:
        return self._require(node_name).outbox

    async def send_command(self, node_name: str, command: types.Command,
                           timeout_s: float = 10.0) -> types.CommandResult:
        """Queue ``command`` for the node and wait for its ack (or a failure)."""
        node = self._require(node_name)
        if not node.connected:
            return types.CommandResult(False, "node is not connected")
        cid = f"{_PREFIX}-{next(_ids)}"
        fut: asyncio.Future[types.CommandResult] = asyncio.get_running_loop().create_future()
        self._pending[cid] = (node_name, fut)
        node.outbox.put_nowait((cid, command))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            return types.CommandResult(False, f"no ack within {timeout_s:g}s")
        finally:
            self._pending.pop(cid, None)

    def ack(self, command_id: str, ok: bool, error: str = "") -> None:
        entry = self._pending.pop(command_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(types.CommandResult(ok, error))

    # -- static upstreams ---------------------------------------------------------------

    def set_static(self, backends: Iterable[types.BackendState]) -> None:
        self._static = {b.key: b for b in backends}
        # Unknown until the first probe; optimistic so a fresh replica can serve at once.
        self._static_healthy = {k: self._static_healthy.get(k, True) for k in self._static}
        self.version += 1

    def set_static_health(self, key: str, healthy: bool) -> None:
        if key in self._static and self._static_healthy.get(key) != healthy:
            self._static_healthy[key] = healthy
            self.version += 1

    def set_static_salted(self, key: str, takes: bool, shares: bool) -> None:
        """What a kind-less static upstream's document said (``core.cache_salt.offered``):
        whether it ``takes`` ``cache_salt`` (salted from now on, its prefix cache not
        shared), and, when it does not, whether tenants then ``shares`` its prefix cache.
        Said again whenever the document is read again: another server may answer at the
        upstream's URL."""
        b = self._static.get(key)
        if b is not None and (b.takes_salt, b.shares_cache) != (takes, shares and not takes):
            self._static[key] = dataclasses.replace(b, takes_salt=takes,
                                                    shares_cache=shares and not takes)
            self.version += 1

    def set_static_load(self, key: str, load: types.EngineLoad) -> None:
        """What a static upstream's own metrics say (its kind's /metrics, when it has any)."""
        b = self._static.get(key)
        if b is None:
            return
        new = dataclasses.replace(
            b, waiting=load.waiting, running=load.running, kv_usage=load.kv_usage,
            kv_capacity_tokens=load.kv_capacity_tokens or b.kv_capacity_tokens,
            block_size=load.block_size or b.block_size, metrics_ok=load.ok)
        if new != b:
            self._static[key] = new
            self.version += 1

    # -- views --------------------------------------------------------------------------

    def node_status(self, node: _Node) -> types.NodeStatus:
        if not node.connected or self._clock() - node.last_seen > self._down_after_s:
            return "down"
        if node.commanded_drain or node.agent_draining:
            return "draining"
        if node.cordoned:
            return "cordoned"
        return "ready"

    def nodes(self) -> list[types.NodeView]:
        now = self._clock()
        return [types.NodeView(
            info=n.info, status=self.node_status(n), cordoned=n.cordoned,
            draining=n.commanded_drain or n.agent_draining, connected=n.connected,
            last_report_age_s=max(0.0, now - n.last_seen), backends=n.backends,
            report=n.report) for n in self._nodes.values()]

    def node(self, name: str) -> types.NodeView | None:
        return next((v for v in self.nodes() if v.info.name == name), None)

    def all_backends(self) -> list[tuple[types.BackendState, str]]:
        """Every known backend with why it is not routable ("" when it is).

        Asked on every request, so the answer is kept until the registry changes or
        ``VIEW_TTL_S`` passes (silence turns a node down with the clock, not an event).
        """
        now = self._clock()
        cached = self._view
        if cached is not None and cached[0] == self.version and now - cached[1] < VIEW_TTL_S:
            return cached[2]
        out = self._compute_backends()
        self._view = (self.version, now, out)
        return out

    def _compute_backends(self) -> list[tuple[types.BackendState, str]]:
        out: list[tuple[types.BackendState, str]] = []
        for node in self._nodes.values():
            status = self.node_status(node)
            for b in node.backends:
                why = f"node {status}" if status != "ready" else (
                    "" if b.phase == "ready" else f"backend {b.phase}")
                out.append((b, why))
        for key, b in self._static.items():
            out.append((b, "" if self._static_healthy.get(key, True) else "health probe failed"))
        return out

    def routable(self, model: str, task: types.Task | None = None) -> list[types.BackendState]:
        return [b for b, why in self.all_backends()
                if not why and model in b.models and (task is None or b.serves(task))]

    def backends_for(self, model: str) -> list[tuple[types.BackendState, str]]:
        return [(b, why) for b, why in self.all_backends() if model in b.models]

    def served_models(self) -> frozenset[str]:
        """Models some backend serves, plus those an up agent embeds in process (asked on
        every request that names a model; kept like :meth:`all_backends`)."""
        now = self._clock()
        cached = self._served
        if cached is not None and cached[0] == self.version and now - cached[1] < VIEW_TTL_S:
            return cached[2]
        models = {m for b, _ in self.all_backends() for m in b.models}
        models.update(m for n in self.ready_embed_nodes() for m in n.embed_models)
        self._served = (self.version, now, frozenset(models))
        return self._served[2]

    def node_key_at(self, address: str) -> str | None:
        """The key of the node that registered ``address`` for its Node service (None:
        none did, or its agent chose none): a key only ever goes to an address its own
        node registered, and no two nodes that are up hold one address (a node down
        may still name the address another took since: the live one's key wins)."""
        return self._at(address)[0]

    def node_pin_at(self, address: str) -> types.NodePin | None:
        """The certificate the node that registered ``address`` pinned for its Node
        service (None: none did, or its agent sent none): a certificate is trusted at no
        other address than its node's, and where a live node and a node down name one
        address, the live one's pin (or its lack of one) holds."""
        return self._at(address)[1]

    def _at(self, address: str) -> tuple[str | None, types.NodePin | None]:
        """(key, pin) of the one node an address is now: the live one, else the node down
        that registered it last. Both come from that node, never one from each: a node
        down's key must not go to a live node's certificate, nor the reverse."""
        cached = self._keys_at
        if cached is None or cached[0] != self.version:
            live_last = sorted(self._nodes.values(), key=lambda n: self.node_status(n) != "down")
            at = {address_key(n.info.address): (n.info.node_key, n.info.node_pin)
                  for n in live_last if n.info.address}
            cached = self._keys_at = (self.version, at)
        return cached[1].get(address_key(address), (None, None))

    def ready_embed_nodes(self) -> list[types.EmbedNode]:
        """Up nodes whose agent serves ``Node.Embed`` (for the semantic cache)."""
        return [types.EmbedNode(n.info.name, n.info.address, n.info.embed_models,
                                n.info.node_key)
                for n in self._nodes.values()
                if n.info.address and n.info.embed_models and self.node_status(n) != "down"]

    def static_backends(self) -> list[types.BackendState]:
        return list(self._static.values())
