"""A token a route wants as ``Authorization: Bearer <token>``, read from a file of the
configuration (``metrics.bearer_token_file`` on the control plane and on the agents).

Kept as its sha256 and compared with :func:`hmac.compare_digest` on digests, so the time a
check takes says nothing about how much of a guess matched, nor about the token's length.
The file's surrounding whitespace is stripped; an unreadable or empty file is a
:class:`TokenFileError` naming the setting (a config error, never the token).
"""

from __future__ import annotations

import hashlib
import hmac
import pathlib


class TokenFileError(ValueError):
    """The token file cannot be read or is empty."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def read_digest(path: str | None, field: str) -> bytes | None:
    """The sha256 of the token in ``path``; None without a path."""
    return None if path is None else digest(read(path, field))


def read(path: str, field: str) -> str:
    """The token in ``path`` (whitespace stripped); :class:`TokenFileError` naming
    ``field`` when it cannot be read or is empty."""
    file = pathlib.Path(path)
    try:
        token = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise TokenFileError(f"{field}: cannot read {file}: {why}") from None
    if not token:
        raise TokenFileError(f"{field}: {file} is empty")
    return token


def presented(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme in any case)."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def matches(wanted: bytes, authorization: str | None) -> bool:
    """Whether ``authorization`` carries the token whose sha256 is ``wanted``."""
    token = presented(authorization)
    return token is not None and hmac.compare_digest(digest(token), wanted)
