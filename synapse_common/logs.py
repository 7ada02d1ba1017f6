"""One logging setup for every Synapse process.

Human format by default (``time level logger message key=value…``), JSON lines with
``--log-format json``. Request ids and node names are context fields: set them with
:func:`bind` (a context variable, so concurrent requests on one event loop do not mix) or
pass ``extra={"request_id": …}``. A redaction filter replaces every configured secret
with ``***`` in the message and in every field before any handler sees the record, and the
credentials of any URL that carries them (``scheme://user:password@host``: an upstream's
URL, a library's error quoting one). In the human format a field's value that could end
the line or start another field (whitespace or controls) is written quoted and escaped.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

CONTEXT_FIELDS = ("request_id", "node", "tenant", "backend", "model")
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "synapse_log_context", default={})  # noqa: B039 - never mutated, replaced on bind

# "user:password@" after "scheme://", to the authority's last "@" (a password may hold one).
# Whitespace and control characters do not end it: URL parsers drop a tab or a newline
# and percent-encode a space, so "user:pa ss\t@host" works and its password must not show.
# Text after a URL with no path may be hidden up to a later "@": the safe side.
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/?#]*@")
_PLAIN = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\u2028\u2029]*")     # a value as it is

_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


@contextmanager
def bind(**fields: str) -> Iterator[None]:
    """Attach fields (e.g. ``request_id``) to every record logged in this context."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")}


def mask_url_credentials(text: str) -> str:
    """``text`` with the credentials of every URL in it masked (``http://***@host``): an
    upstream's URL may carry ``user:password@``. The one rule for logs, the settings' repr
    and what the Admin API shows of a backend."""
    return _URL_CREDENTIALS.sub("***@", text) if "://" in text else text


class RedactingFilter(logging.Filter):
    """Adds context fields and scrubs secrets from the message and the fields."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first so a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return mask_url_credentials(text)

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        record.msg = self.scrub(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        record.exc_info = None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, self.scrub(value))
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _field(value: Any) -> str:
    """A field's value as the human format writes it: as it is, or quoted and escaped."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={_field(v)}" for k, v in sorted(_extras(record).items()))
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


def setup(fmt: str = "human", level: str = "info", secrets: Iterable[str] = (),
          stream: Any = None) -> None:
    """Configure the root logger once per process (replaces earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "grpc", "urllib3", "httpx", "pymilvus"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def adopt(name: str) -> None:
    """Send the records of library logger ``name`` (and its children) through the root's
    handler, hence this module's format and redaction, when the library installed its own
    handlers on import (pymilvus does: its lines skipped ``--log-format json`` and the
    redaction); at warning level at least, as :func:`setup` sets for noisy libraries."""
    level = max(logging.WARNING, logging.getLogger().level)
    for logger_name in [name, *(n for n in logging.root.manager.loggerDict
                                if n.startswith(name + "."))]:
        logger = logging.getLogger(logger_name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(level)
