"""Media URLs in requests, which an engine would fetch: refused when they point inside.

A multimodal engine fetches the images, audio and video a request names by URL, from
where it runs: a GPU node, inside the cluster, often beside the cloud's metadata service.
Any tenant could make it request an internal address (a blind server-side request
forgery). ``http.media_urls`` (:data:`POLICIES`) decides what a request may name:

- ``public`` (the default): ``data:`` URLs, and ``http(s)`` URLs whose host is a name or
  a public address; refused: a host that is a loopback, private, link-local, reserved or
  multicast address (IPv4, IPv6, IPv4-mapped), ``localhost`` and names under
  ``.localhost``, ``.local`` and ``.internal``, and every other scheme (``file:``);
- ``inline``: ``data:`` URLs only;
- ``any``: every URL, as the engine would take it.

A name is not resolved here (the engine resolves it, perhaps to another address), so
``public`` stops addresses and the well-known internal names, not a public name that
resolves inside: vLLM's ``--allowed-media-domains`` (``extra_args`` of the engine) and an
egress NetworkPolicy on engine pods close the rest.

Where URLs are looked for: chat messages' content parts (``image_url``, ``video_url``,
``audio_url``, also Anthropic's images once translated to them) and Responses input
parts (``input_image.image_url``, ``input_file.file_url``). A refusal is a 400 naming
the field.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal

from controlplane import errors

Policy = Literal["public", "inline", "any"]
POLICIES: tuple[Policy, ...] = ("public", "inline", "any")
_CHAT_PARTS = {"image_url": "image_url", "video_url": "video_url", "audio_url": "audio_url"}
_RESPONSES_PARTS = {"input_image": "image_url", "input_file": "file_url"}
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal")
MAX_URL = 8192                  # characters of an http(s) media URL


def check_chat(messages: Any, policy: Policy, field: str = "messages") -> None:
    """Refuse (400) a media URL in chat ``messages`` that ``policy`` does not allow.

    ``messages`` is parsed JSON: lists and dicts, tested as such (an ABC's isinstance
    costs more than the rest of the walk for a text-only chat)."""
    if policy == "any" or not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue                    # text: nothing to fetch
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            key = _CHAT_PARTS.get(kind) if isinstance(kind, str) else None
            if key is None:
                continue
            value = part.get(key)
            url = value.get("url") if isinstance(value, Mapping) else value
            check(url, f"{field}[{i}].content[{j}].{key}", policy)


def check_responses(body: Mapping[str, Any], policy: Policy) -> None:
    """Refuse (400) a media URL in a Responses request's ``input`` that ``policy`` does not
    allow."""
    items = body.get("input")
    if policy == "any" or not isinstance(items, list):
        return
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue
        parts = item.get("content")
        for j, part in enumerate(parts if isinstance(parts, list) else [item]):
            kind = part.get("type") if isinstance(part, Mapping) else None
            key = _RESPONSES_PARTS.get(kind) if isinstance(kind, str) else None
            if key is not None and part.get(key) is not None:
                check(part.get(key), f"input[{i}].content[{j}].{key}", policy)


def check(url: object, field: str, policy: Policy) -> None:
    """Refuse (400, naming ``field``) ``url`` unless ``policy`` allows it."""
    if policy == "any" or url is None:
        return
    if not isinstance(url, str):
        raise _refused(field, "must be a URL string")
    scheme, _, rest = url.partition(":")
    scheme = scheme.strip().lower()
    if scheme == "data":
        return
    if policy == "inline":
        raise _refused(field, "must be a data: URL (http.media_urls is inline)")
    if scheme not in ("http", "https") or not rest.startswith("//"):
        raise _refused(field, "must be a data:, http: or https: URL")
    if len(url) > MAX_URL:
        raise _refused(field, f"is longer than {MAX_URL} characters")
    if "\\" in url or any(c <= " " or c == "\x7f" for c in url):
        # parsers disagree on these (a backslash ends the host for browsers' parser,
        # not for Python's): what is checked must be what the engine fetches
        raise _refused(field, "contains a backslash, a space or a control character")
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError:
        raise _refused(field, "is not a valid URL") from None
    if "@" in parts.netloc:
        raise _refused(field, "carries credentials (user@host)")
    if not host:
        raise _refused(field, "names no host")
    if _internal(host):
        raise _refused(field, "points to an internal address, which the engine would "
                              "fetch from inside the cluster (http.media_urls)")


def _internal(host: str) -> bool:
    if host == "localhost" or host.endswith(_INTERNAL_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return _legacy_ipv4(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def _legacy_ipv4(host: str) -> bool:
    """Forms ``inet_aton`` takes that ``ip_address`` does not (``127.1``, ``0x7f.1``,
    ``2130706433``): a fetcher may read them as addresses, so they count as internal
    unless they read as a public one."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts):
        return False
    try:
        numbers = [int(p, 0) if not p.isdigit() or len(p) == 1 or p[0] != "0" else int(p, 8)
                   for p in parts]
    except ValueError:
        return False                    # a name
    value = 0
    for n in numbers[:-1]:
        if not 0 <= n <= 255:
            return True
        value = value * 256 + n
    last_bits = 8 * (5 - len(parts))
    if not 0 <= numbers[-1] < (1 << last_bits):
        return True
    value = (value << last_bits) + numbers[-1]
    address = ipaddress.IPv4Address(value)
    return not address.is_global or address.is_multicast


def _refused(field: str, why: str) -> errors.BadRequest:
    return errors.BadRequest(f"{field}: {why}", param=field, code="invalid_media_url")
