"""Responses ids that only the tenant who made them can use (pure).

vLLM keeps a stored Responses answer in its own memory under an id ``resp_…`` and
continues that conversation for anyone who names the id in ``previous_response_id``, and
engines are shared by every tenant. So a client never sees an engine's id as it is: it
sees the engine's id, ``_``, then a *tag*, a keyed MAC (HMAC-SHA256 cut to 128 bits,
base64url) of the tenant and the engine's id (:meth:`Seal.seal`). A continuation's id is
opened with the caller's tenant (:meth:`Seal.open`) before anything is routed; an id
sealed for another tenant, an altered or forged one, a bare engine id and anything that
is not an id all open to nothing, and the caller gets the answer an id that never existed
gets (:func:`not_found`), from the control plane itself: no engine sees the request.

* **Stateless.** Nothing is stored, so the rule holds on every worker of a pod, on every
  replica and across a control-plane restart (vLLM keeps its store across ours), as long
  as they share the key. The key is stretched (scrypt: :func:`stretched`) from a secret
  of the configuration (``auth.response_id_key``, else ``auth.admin_key`` when it has at
  least :data:`MIN_ADMIN_KEY` characters: :meth:`Seal.from_secrets`), since every id a
  tenant sees is a sample to guess that secret from offline. Without one, each process
  draws a random key: continuations then work only on the process that made the answer,
  and are refused (404) on any other or after a restart — closed, never open.
* **Rotation.** A new key refuses every id sealed under the old one (404, the answer
  for an unknown id): rotate the secret when old conversations may be lost, or set
  ``auth.response_id_key`` so that rotating the admin key leaves the ids alone.
* **What is rewritten in an answer** (:class:`AnswerIds`): the id the engine minted for
  this answer — found where only the engine writes it: the top-level ``id`` of a whole
  answer, ``response.id`` of a stream's events — and the echo of the previous id that
  was opened for this tenant. Nothing else, however much it looks like an id: a tenant
  can make an engine echo any string (``metadata``, tool arguments), and sealing that
  for it would hand it another tenant's conversation. Only whole lines are rewritten
  (:class:`WholeLines`), so an id cut across two network chunks is still found; a line
  longer than the longest answer the control plane assembles ends the stream with an
  error instead (a hostile engine never makes it hold more).
* **What the engine never gets from a client**: ``request_id`` (vLLM names the answer,
  and its stored history, after it; a tenant choosing it could overwrite another's
  conversation): :func:`engine_body` drops it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Any

import orjson

from controlplane import errors
from controlplane.core import sse

SEPARATOR = "_"
TAG_BYTES = 16
TAG_CHARS = 22                    # base64url of TAG_BYTES, without padding
MAX_ID = 256                      # longer is no id of ours (checked before any hashing)
_LABEL = b"synapse/responses-id/v2"     # v2: scrypt-stretched (v1: HMAC of the secret)
MIN_ADMIN_KEY = 16                # characters of an admin key the ids' key may come from
# The longest unfinished line a stream's ids are looked for in: an event's line is one
# JSON value, at most the whole answer (``response.completed`` carries it all).
LINE_MAX = sse.ASSEMBLED_MAX
_ENGINE_ID = re.compile(r"resp_[A-Za-z0-9_-]{1,128}\Z")
_TAG = re.compile(rf"[A-Za-z0-9_-]{{{TAG_CHARS}}}\Z")
# A whole answer's own id: the first member of the object (vLLM and the simulator write
# ``id`` first); a client-chosen string cannot stand there.
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,128})"')


@functools.lru_cache(maxsize=4)
def stretched(secret: str) -> bytes:
    """The ids' key from ``secret``: scrypt (memory-hard, a few tens of milliseconds once
    per process), so that guessing the secret offline from ids costs as much per guess."""
    return hashlib.scrypt(secret.encode("utf-8"), salt=_LABEL, n=1 << 14, r=8, p=1,
                          dklen=32)


class Seal:
    """Seals engine ids for a tenant and opens them again (one key)."""

    def __init__(self, key: bytes, shared: bool, weak_admin_key: bool = False) -> None:
        self._key = key
        self.shared = shared      # False: a key of this process only
        self.weak_admin_key = weak_admin_key    # an admin key too short to derive it from

    def __repr__(self) -> str:
        return f"Seal(shared={self.shared})"          # never the key

    @classmethod
    def from_secrets(cls, response_id_key: str | None, admin_key: str | None) -> Seal:
        """The key stretched from the first secret given (:func:`stretched`); a random one
        of this process (``shared`` False) when there is none, or when the only one is an
        admin key shorter than :data:`MIN_ADMIN_KEY` (``weak_admin_key`` set): every id a
        tenant sees is a sample to guess the secret from offline, and the admin key opens
        the Admin API."""
        if response_id_key:
            return cls(stretched(response_id_key), shared=True)
        if admin_key and len(admin_key) >= MIN_ADMIN_KEY:
            return cls(stretched(admin_key), shared=True)
        return cls(secrets.token_bytes(32), shared=False, weak_admin_key=bool(admin_key))

    def _tag(self, tenant: str, engine_id: str) -> bytes:
        who = tenant.encode()
        message = len(who).to_bytes(4, "big") + who + engine_id.encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()[:TAG_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=")

    def seal(self, tenant: str, engine_id: str) -> str:
        """The id ``tenant``'s client sees for the engine's ``engine_id``."""
        return f"{engine_id}{SEPARATOR}{self._tag(tenant, engine_id).decode()}"

    def open(self, tenant: str, client_id: str) -> str | None:
        """The engine's id behind ``client_id`` when it was sealed for ``tenant``, else
        None (whatever else it is)."""
        if len(client_id) > MAX_ID:
            return None
        cut = len(client_id) - TAG_CHARS - len(SEPARATOR)
        engine_id, separator, tag = client_id[:cut], client_id[cut:-TAG_CHARS], \
            client_id[-TAG_CHARS:]
        if separator != SEPARATOR or not _ENGINE_ID.match(engine_id) or not _TAG.match(tag):
            return None
        if not hmac.compare_digest(self._tag(tenant, engine_id), tag.encode()):
            return None
        return engine_id


def not_found(client_id: str) -> errors.NotFound:
    """The answer for a previous id that names nothing this tenant may continue: the
    same whether it never existed, was sealed for another tenant, or the engine lost it."""
    shown = client_id if len(client_id) <= MAX_ID else client_id[:MAX_ID] + "…"
    return errors.NotFound(f"Previous response with id '{shown}' not found.",
                           param="previous_response_id", code="previous_response_not_found")


def engine_body(body: Mapping[str, Any], previous: str | None) -> dict[str, Any]:
    """The request as the engine gets it: the opened previous id, no ``request_id``."""
    out = {k: v for k, v in body.items() if k != "request_id"}
    if previous is not None:
        out["previous_response_id"] = previous
    return out


def whole_id(data: bytes) -> str | None:
    """The id the engine minted for a whole answer (its top-level ``id``)."""
    if (found := _LEADING_ID.match(data)) is not None:
        return found.group(1).decode()
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return _engine_id(parsed.get("id")) if isinstance(parsed, dict) else None


def stream_id(lines: bytes) -> str | None:
    """The id the engine minted for a streamed answer: ``response.id`` of the first of
    these whole lines whose event carries the response object."""
    for line in lines.splitlines():
        if not line.startswith(b"data:") or b'"response"' not in line:
            continue
        try:
            parsed = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            continue
        inner = parsed.get("response") if isinstance(parsed, dict) else None
        if isinstance(inner, dict) and (rid := _engine_id(inner.get("id"))):
            return rid
    return None


def _engine_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _ENGINE_ID.match(value) else None


class AnswerIds:
    """The ids of one answer as one tenant's client sees them: the engine's own id once
    learnt (:meth:`learn`), and the previous id the request continued."""

    def __init__(self, seal: Seal, tenant: str, previous: tuple[str, str] | None) -> None:
        self._seal = seal
        self._tenant = tenant
        self.engine_id: str | None = None
        self._swaps: list[tuple[bytes, bytes]] = []
        if previous is not None:            # (engine's, client's)
            self._swaps.append(_quoted(*previous))

    def learn(self, engine_id: str) -> None:
        self.engine_id = engine_id
        self._swaps.append(_quoted(engine_id, self._seal.seal(self._tenant, engine_id)))

    def rewrite(self, data: bytes) -> bytes:
        """``data`` (whole JSON values or whole events) with those ids sealed."""
        for engine, client in self._swaps:
            if engine in data:
                data = data.replace(engine, client)
        return data


def _quoted(engine: str, client: str) -> tuple[bytes, bytes]:
    return b'"' + engine.encode() + b'"', b'"' + client.encode() + b'"'


class WholeLines:
    """Cuts a stream after its last line break: :meth:`feed` returns the whole lines
    received so far (bytes as they came) and keeps an unfinished one for later. An id
    never spans lines (an event's ``data:`` is one JSON line), so whole lines are enough
    to find and rewrite every id, and an event is never held back beyond its last line.
    It is the one home of cutting a stream at whole lines: ``cache_salt.StreamHider``
    zeroes cached-token counts over it too.

    Each byte is searched for a line break once and the unfinished line grows in place,
    so a long line costs linear work. It is held up to ``limit`` bytes (by default
    :data:`LINE_MAX`, the longest answer the control plane assembles): past that the
    engine is hostile or broken, and :meth:`feed` raises an ``UpstreamError`` — the relay
    ends the stream with its error event and lets the engine go — rather than hold more,
    or pass on a line whose ids it could not rewrite."""

    __slots__ = ("_held", "limit")

    def __init__(self, limit: int = LINE_MAX) -> None:
        self._held = bytearray()
        self.limit = limit

    @property
    def held(self) -> int:
        """Bytes of an unfinished line held."""
        return len(self._held)

    def feed(self, data: bytes) -> bytes:
        end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        if end == 0:
            self._hold(data)
            return b""
        if self._held:
            self._held += memoryview(data)[:end]
            out = bytes(self._held)
            self._held.clear()
        else:
            out = data if end == len(data) else data[:end]
        self._hold(memoryview(data)[end:])
        return out

    def _hold(self, piece: bytes | memoryview) -> None:
        self._held += piece
        if len(self._held) > self.limit:
            self._held = bytearray()
            raise errors.UpstreamError(f"the backend sent a line of over {self.limit} "
                                       "bytes without a line break")

    def rest(self) -> bytes:
        """What is left when the stream ends (a last line without its line break)."""
        held, self._held = bytes(self._held), bytearray()
        return held
