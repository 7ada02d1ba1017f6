"""Which node an agent runs on, as the Kubernetes API says: a TokenReview of the projected
ServiceAccount token the agent presents on ``ControlPlane.Connect``.

The control plane POSTs ``authentication.k8s.io/v1`` TokenReviews to the API server with
its own ServiceAccount token (its account needs ``create`` on ``tokenreviews``, as the
chart's ClusterRole grants; ``system:auth-delegator`` grants it and more)
and accepts an agent's token only when all of these hold:

* ``status.authenticated`` is true;
* ``status.audiences`` names our audience: an authenticator that knows nothing of
  audiences returns none, and a token made for the API server itself (or anyone else)
  must not open the agents' door;
* ``status.user.username`` is one of the agents' ServiceAccounts;
* ``status.user.extra["authentication.kubernetes.io/node-name"]`` holds exactly one name.
  The key is ``serviceaccount.NodeNameKey`` of k8s.io/apiserver
  (``pkg/authentication/serviceaccount/util.go``, beside ``PodNameKey`` and ``NodeUIDKey``);
  the API server puts it in the user info of pod-bound tokens from Kubernetes 1.30
  (KEP-4193, feature ``ServiceAccountTokenPodNodeInfo``, on by default).

A refusal (any check failing) is ``None``; not being able to tell (no connection, a time
out, an answer that is not a TokenReview, the API server refusing *our* credentials) is
:class:`ReviewUnavailable`, so the caller can tell "this token is not an agent's" from
"ask again later". Foreign exceptions are translated in one table, :data:`ERRORS`.

Secrets: neither the agent's token nor our own ever reaches a log line, an exception's
text or ``repr``; the positive-result cache is keyed by the token's sha256. Refusals are
logged once per distinct reason (a bounded set), since a caller may repeat one forever.

Load: whoever reaches the gRPC port can present tokens, and each would become a request
to the API server. So a token is first read locally (:func:`claims_problem`, no
signature check: only the API server can say it is genuine): one that is not a JWT
issued for our audience and still unexpired is refused without asking. At most
``max_concurrent`` reviews are in flight; up to :data:`MAX_WAITING` more wait for a
place (at most ``timeout_s``), and one past those is :class:`ReviewUnavailable` at once. A positive
answer is remembered for ``cache_ttl_s`` (30 s by default, bounded entries), so an agent
reconnecting in a loop costs one review per TTL; a token revoked (its pod deleted) within
that window is still accepted until it lapses, which is why the TTL is short.

Our own token rotates (the kubelet rewrites the projected file): it is re-read whenever the
file's mtime or size changes. Each review has its own HTTP session (and reads the CA
bundle), closed with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import aiohttp

from synapse_common import clock as clocks

log = logging.getLogger("synapse.controlplane.token_review")

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"   # serviceaccount.NodeNameKey
MAX_ANSWER_BYTES = 256 * 1024
CACHE_ENTRIES = 1024
LOGGED_REASONS = 256    # distinct refusal reasons logged; later ones go to debug
MAX_WAITING = 64        # reviews waiting for a place
MAX_TOKEN_CHARS = 16 * 1024


class ReviewUnavailable(Exception):
    """The API server could not be asked, or its answer says nothing about the token."""


class ReviewConfig(Protocol):
    """What the reviewer reads of :class:`controlplane.settings.tenants.AgentReviewSettings`
    (a Protocol: adapters sit below the settings layer)."""

    @property
    def service_accounts(self) -> Sequence[str]: ...
    @property
    def audience(self) -> str: ...
    @property
    def api_server(self) -> str: ...
    @property
    def token_file(self) -> str: ...
    @property
    def ca_file(self) -> str: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def max_concurrent(self) -> int: ...


# Foreign exception -> what it means. The most specific entry wins (an ssl.SSLError and
# aiohttp's connection errors are OSErrors too). Texts name no secret: the exception's own
# text is never used, since a client library may quote the request.
ERRORS: dict[type[BaseException], str] = {
    OSError: "cannot connect",
    ssl.SSLError: "cannot connect over TLS (is ca_file the cluster's CA?)",
    aiohttp.ClientConnectionError: "cannot connect",
    aiohttp.ClientSSLError: "cannot connect over TLS (is ca_file the cluster's CA?)",
    aiohttp.ClientPayloadError: "the answer broke off",
    aiohttp.ClientResponseError: "the answer was not valid HTTP",
    aiohttp.ClientError: "the request failed",
    TimeoutError: "no answer in time",
}


def translate(exc: BaseException) -> str:
    """What a foreign exception of :data:`ERRORS` means (its class name otherwise)."""
    found: type[BaseException] | None = None
    for foreign in ERRORS:
        if isinstance(exc, foreign) and (found is None or issubclass(foreign, found)):
            found = foreign
    return ERRORS[found] if found is not None else type(exc).__name__


class TokenReviewer:
    """Asks the API server which node a presented token is bound to (:meth:`node_of`)."""

    def __init__(self, config: ReviewConfig, *, session: aiohttp.ClientSession | None = None,
                 clock: clocks.Clock = clocks.monotonic, wall: clocks.Clock = clocks.wall,
                 cache_ttl_s: float = 30.0, max_waiting: int = MAX_WAITING) -> None:
        if not 0 <= cache_ttl_s <= 60:
            raise ValueError("cache_ttl_s: must be between 0 and 60 seconds")
        self._config = config
        self._url = config.api_server.rstrip("/") + PATH
        self._accounts = frozenset(config.service_accounts)
        self._session = session
        self._clock = clock
        self._wall = wall       # tokens' expiry is wall-clock time
        self._ttl = cache_ttl_s
        self._cache: dict[bytes, tuple[str, float]] = {}
        self._in_flight = 0
        self._waiting = 0
        self._max_waiting = max_waiting
        self._turns: asyncio.Condition | None = None     # made on the serving loop
        self._bearer: tuple[tuple[int, int], str] | None = None   # ((mtime_ns, size), token)
        self._logged: set[str] = set()

    def __repr__(self) -> str:
        return (f"TokenReviewer(api_server={self._config.api_server!r}, "
                f"audience={self._config.audience!r}, "
                f"service_accounts={sorted(self._accounts)!r})")

    async def node_of(self, token: str) -> str | None:
        """The node ``token`` is bound to, or None when it is not an agent's token.

        Raises :class:`ReviewUnavailable` when the API server cannot tell (or when too
        many reviews are in flight and waiting, see the module docstring)."""
        key = hashlib.sha256(token.encode("utf-8")).digest()
        cached = self._cached(key)
        if cached is not None:
            return cached
        problem = claims_problem(token, self._config.audience, self._wall())
        if problem is not None:
            self._say(problem)
            return None
        async with self._place():
            status = await self._review(token)
        node = self._judge(status, token)
        if node is not None and self._ttl > 0:
            self._remember(key, node)
        return node

    @contextlib.asynccontextmanager
    async def _place(self) -> AsyncIterator[None]:
        """One of ``max_concurrent`` places, waited for (see the module docstring)."""
        if self._turns is None:
            self._turns = asyncio.Condition()
        turns, limit = self._turns, self._config.max_concurrent
        if self._in_flight >= limit:
            if self._waiting >= self._max_waiting:
                raise ReviewUnavailable(f"{self._in_flight} token reviews are in flight and "
                                        f"{self._waiting} waiting already "
                                        "(agent_review.max_concurrent)")
            self._waiting += 1
            try:
                async with turns:
                    await asyncio.wait_for(turns.wait_for(lambda: self._in_flight < limit),
                                           self._config.timeout_s)
            except TimeoutError:
                raise ReviewUnavailable("no place for a token review in time "
                                        "(agent_review.max_concurrent)") from None
            finally:
                self._waiting -= 1
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            async with turns:
                turns.notify()

    # -- asking ---------------------------------------------------------------------------

    async def _review(self, token: str) -> Mapping[str, Any]:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self._config.audience]}}
        headers = {"Authorization": f"Bearer {self._own_token()}",
                   "Content-Type": "application/json", "Accept": "application/json"}
        try:
            async with asyncio.timeout(self._config.timeout_s), self._session_now() as session:
                async with session.post(self._url, data=json.dumps(body), headers=headers,
                                        allow_redirects=False) as resp:
                    status, raw = resp.status, await resp.content.read(MAX_ANSWER_BYTES + 1)
        except (OSError, aiohttp.ClientError, TimeoutError) as exc:
            raise ReviewUnavailable(f"TokenReview at {self._config.api_server}: "
                                    f"{translate(exc)}") from None
        if not 200 <= status < 300:
            raise ReviewUnavailable(f"TokenReview at {self._config.api_server}: "
                                    f"{_refused(status)}")
        return _status_of(raw)

    def _session_now(self) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientSession]:
        """The session for one review: the injected one (kept open), else a new one,
        closed with the review. Reviews are rare (one per agent stream, then cached), so
        nothing is kept open between them and nothing needs closing at shutdown."""
        if self._session is not None:
            return contextlib.nullcontext(self._session)
        https = self._url.startswith("https:")
        connector = aiohttp.TCPConnector(ssl=self._tls()) if https else aiohttp.TCPConnector()
        return aiohttp.ClientSession(connector=connector)

    def _tls(self) -> ssl.SSLContext:
        """Verification with the cluster's CA only (not the system's CAs)."""
        path = self._config.ca_file
        try:
            return ssl.create_default_context(cafile=path)
        except (OSError, ValueError) as exc:   # ssl.SSLError is an OSError
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ReviewUnavailable(f"agent_review.ca_file: cannot load {path}: {why}") from None

    def _own_token(self) -> str:
        """Our ServiceAccount token, re-read when the kubelet has rotated the file."""
        path = self._config.token_file
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            if self._bearer is None or self._bearer[0] != stamp:
                with open(path, encoding="utf-8") as f:
                    self._bearer = (stamp, f.read().strip())
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ReviewUnavailable(f"agent_review.token_file: cannot read {path}: {why}") from None
        if not self._bearer[1]:
            raise ReviewUnavailable(f"agent_review.token_file: {path} is empty")
        return self._bearer[1]

    # -- judging --------------------------------------------------------------------------

    def _judge(self, status: Mapping[str, Any], token: str) -> str | None:
        reason = _refusal(status, self._config.audience, self._accounts)
        if isinstance(reason, _Accepted):
            return reason.node
        self._say(reason.replace(token, "<token>") if token else reason)
        return None

    def _say(self, reason: str) -> None:
        if reason in self._logged:
            return
        if len(self._logged) >= LOGGED_REASONS:
            log.debug("agent token refused: %s", reason)
            return
        self._logged.add(reason)
        log.warning("agent token refused: %s", reason)

    def _cached(self, key: bytes) -> str | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._cache[key]
            return None
        return entry[0]

    def _remember(self, key: bytes, node: str) -> None:
        self._cache.pop(key, None)
        while len(self._cache) >= CACHE_ENTRIES:
            del self._cache[next(iter(self._cache))]    # the oldest entry
        self._cache[key] = (node, self._clock() + self._ttl)


def claims_problem(token: str, audience: str, now: float) -> str | None:
    """Why ``token`` cannot be a projected service-account token for ``audience``,
    unexpired at ``now`` (wall-clock seconds), read without checking its signature
    (None: it may be; then only the API server can say)."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3:
        return "not a JWT"
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return "not a JWT (its claims are not JSON)"
    if not isinstance(claims, dict):
        return "not a JWT (its claims are not an object)"
    aud = claims.get("aud")
    if audience not in (aud if isinstance(aud, list) else [aud]):
        return f"not issued for audience {audience!r}"
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= now:
        return "expired, or no expiry"
    return None


class _Accepted:
    __slots__ = ("node",)

    def __init__(self, node: str) -> None:
        self.node = node


def _refusal(status: Mapping[str, Any], audience: str,
             accounts: frozenset[str]) -> _Accepted | str:
    """The node when every check holds, else why not (a log line's text)."""
    if status.get("authenticated") is not True:
        error = status.get("error")
        return "not authenticated" + (f" ({str(error)[:200]})" if error else "")
    audiences = status.get("audiences")
    if not isinstance(audiences, list) or audience not in audiences:
        return (f"not issued for audience {audience!r} (the API server answered audiences "
                f"{audiences!r})")
    user = status.get("user")
    user = user if isinstance(user, dict) else {}
    username = user.get("username")
    if username not in accounts:
        return f"service account {str(username)[:300]!r} is not an agent account"
    extra = user.get("extra")
    nodes = extra.get(NODE_NAME_KEY) if isinstance(extra, dict) else None
    if not nodes:
        return (f"the token of {username} carries no node name (Kubernetes < 1.30, or not "
                "a pod's projected token?)")
    if not isinstance(nodes, list) or len(nodes) != 1 or not isinstance(nodes[0], str) \
            or not nodes[0]:
        return f"the token of {username} carries no single node name"
    return _Accepted(nodes[0])


def _status_of(raw: bytes) -> Mapping[str, Any]:
    if len(raw) > MAX_ANSWER_BYTES:
        raise ReviewUnavailable("the TokenReview answer is too large")
    try:
        answer = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ReviewUnavailable("the TokenReview answer is not JSON") from None
    status = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(status, dict):
        raise ReviewUnavailable("the TokenReview answer has no status")
    return status


def _refused(status: int) -> str:
    if status == 401:
        return ("HTTP 401: the API server does not accept the control plane's own token "
                "(agent_review.token_file)")
    if status == 403:
        return ("HTTP 403: the control plane's ServiceAccount may not create TokenReviews "
                "(it needs create on tokenreviews.authentication.k8s.io)")
    return f"HTTP {status}"
