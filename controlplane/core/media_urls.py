"""Media URLs in requests, which an engine would fetch: refused when they point inside.

A multimodal engine fetches the images, audio and video a request names by URL, from
where it runs: a GPU node, inside the cluster, often beside the cloud's metadata service.
Any tenant could make it request an internal address (a blind server-side request
forgery). ``http.media_urls`` (:data:`POLICIES`) decides what a request may name:

- ``public`` (the default): ``data:`` URLs, and ``http(s)`` URLs whose host is a name or
  a public address; refused: a host that is a loopback, private, link-local, reserved or
  multicast address (IPv4, IPv6, and IPv6 forms that carry an IPv4 address: mapped
  ``::ffff:0:0/96``, compatible ``::/96``, SIIT ``::ffff:0:0:0/96``, NAT64
  ``64:ff9b::/96``, 6to4 ``2002::/16``, judged by the IPv4 address they carry; local
  NAT64 ``64:ff9b:1::/48``), ``localhost`` and names under ``.localhost``, ``.local``
  and ``.internal``, and every other scheme (``file:``);
- ``inline``: ``data:`` URLs only;
- ``any``: every URL, as the engine would take it.

What is checked is the host the engine's fetcher would connect to, not the string as
sent. vLLM parses a media URL with urllib3's ``parse_url`` and fetches what it rebuilds:
the host percent-decoded (``127%2e0%2e0%2e1`` is ``127.0.0.1``, fetched by vLLM 0.32),
a non-ASCII host IDNA-encoded by the ``idna`` package (strict: it refuses the forms
below) or, without it, by Python's own codec, which splits labels at the ideographic
full stops (U+3002, U+FF0E, U+FF61) and maps full-width letters and digits and invisible
characters away (``127。0。0。1`` is ``127.0.0.1``). So a host with a ``%`` is refused
(no host needs one), and a non-ASCII host is normalised the codec's way (NFKC, those
dots, nameprep) before the rules above; it is refused when nameprep refuses it.

A name is not resolved here (the engine resolves it, perhaps to another address), so
``public`` stops addresses and the well-known internal names, not a public name that
resolves inside: vLLM's ``--allowed-media-domains`` (``extra_args`` of the engine) and an
egress NetworkPolicy on engine pods close the rest. Nor is a redirect followed here: the
agent starts vLLM with ``VLLM_MEDIA_URL_ALLOW_REDIRECTS=0`` (:mod:`agent.core.commands`),
so a public URL that redirects inside is not followed by the engine either.

Where URLs are looked for: every content part of every chat message, and every Responses
input item and its content parts, whatever the part's ``type`` or without one. vLLM's
parser (``_parse_chat_message_content_mm_part`` in ``vllm/renderers/chat_utils.py``)
reads a part by its ``type`` (``image_url``, ``input_image``, ``audio_url``,
``video_url``), but by its keys when it has no ``type`` or carries a ``uuid``
(``{"image_url": "http://…"}`` is an image), and ``input_image`` is taken in chat as in
Responses; so a part is checked by key, not by type: ``image_url``, ``audio_url`` and
``video_url`` (a URL string, or an object's ``url``) and Responses' ``file_url``. The
other media keys vLLM reads carry data, never a URL (``input_audio``: base64 made into
a ``data:`` URL; ``image_embeds``/``audio_embeds``/``video_embeds``/``prompt_embeds``:
base64 tensors). The same parser reads the ``messages`` of ``/tokenize`` and of
``/v1/embeddings`` (beside its ``input``), and the ``{"content": [parts]}`` sides of
``/v1/score`` and ``/v1/rerank``, checked alike (:func:`check_body`, and
``check_chat`` on every serving-path body). Anthropic's images are checked once translated to ``image_url``
parts, and in the body as sent too (``image`` blocks with a ``url`` source, also inside
a ``tool_result``), which vLLM translates itself when it serves ``/v1/messages``.
The ``server_url`` of a Responses ``mcp`` tool gets the same rules, one rule for every URL
a request names for something to connect to (:func:`check_responses`). vLLM 0.32 itself
does not connect to it: its MCP tool server connects only to the servers its
``--tool-server`` flag names, chosen by the tool's ``server_label`` (the request's
``headers`` for that tool are sent along); but an engine that honoured the URL, as
OpenAI's API does, could be aimed inside the cluster by any tenant. The ``url`` of each
of Anthropic's ``mcp_servers`` gets the same rules (:func:`_check_mcp_servers`): vLLM
drops the field, but the body goes as sent to a backend that serves ``/v1/messages``
itself, and one that honours it (an Anthropic-compatible provider) would dial the URL. A
``mcp_servers`` that is not a list of objects is refused whatever the policy: what a
lenient upstream might make of it is not what was checked.

A refusal is a 400 naming the field.
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import unicodedata
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal

from controlplane import errors

Policy = Literal["public", "inline", "any"]
POLICIES: tuple[Policy, ...] = ("public", "inline", "any")
# keys of a content part whose value an engine fetches, whatever the part's type
_URL_KEYS = ("image_url", "audio_url", "video_url", "file_url")
# the fields of /v1/score and /v1/rerank whose multimodal form vLLM parses as chat parts
_SCORE_SIDES = ("text_1", "text_2", "queries", "documents", "items", "data_1", "data_2",
                "query")
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal")
# full stops that IDNA (and so Python's idna codec) takes as label separators
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
MAX_URL = 8192                  # characters of an http(s) media URL


def check_chat(messages: Any, policy: Policy, field: str = "messages") -> None:
    """Refuse (400) a media URL in chat ``messages`` that ``policy`` does not allow.

    ``messages`` is parsed JSON: lists and dicts, tested as such (an ABC's isinstance
    costs more than the rest of the walk for a text-only chat)."""
    if policy == "any" or not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):   # else text: nothing to fetch
            _check_parts(content, f"{field}[{i}].content", policy)


def check_responses(body: Mapping[str, Any], policy: Policy) -> None:
    """Refuse (400) a media URL in a Responses request's ``input`` that ``policy`` does not
    allow: in an item's content parts, or in an item that is itself a part; and the
    ``server_url`` of an ``mcp`` tool likewise (:func:`_check_mcp_tools`)."""
    if policy == "any":
        return
    _check_mcp_tools(body.get("tools"), policy)
    items = body.get("input")
    if not isinstance(items, list):
        return
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        _check_part(item, f"input[{i}]", policy)
        content = item.get("content")
        if isinstance(content, list):
            _check_parts(content, f"input[{i}].content", policy)


def _check_mcp_tools(tools: Any, policy: Policy) -> None:
    """The ``server_url`` of every ``mcp`` tool: a server an engine honouring it would
    connect to from inside the cluster."""
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        if isinstance(tool, dict) and tool.get("type") == "mcp":
            check(tool.get("server_url"), f"tools[{i}].server_url", policy)


def check_body(body: Mapping[str, Any], policy: Policy) -> None:
    """Refuse (400) a media URL ``policy`` does not allow anywhere the engine reads one in
    the body of a call beyond chat (``controlplane.api.calls``): Responses' ``input``,
    ``messages`` (chat-shaped for ``/tokenize``, Anthropic's for ``/v1/messages``), and
    the multimodal ``{"content": [parts]}`` sides of ``/v1/score`` and ``/v1/rerank``;
    and the servers of Anthropic's ``mcp_servers``."""
    _check_mcp_servers(body.get("mcp_servers"), policy)
    if policy == "any":
        return
    check_responses(body, policy)
    messages = body.get("messages")
    check_chat(messages, policy)
    _check_anthropic(messages, policy)
    for name in _SCORE_SIDES:
        if name in body:
            _check_anywhere(body[name], name, policy)


def _check_mcp_servers(servers: Any, policy: Policy) -> None:
    """The ``url`` of every server in Anthropic's ``mcp_servers`` (a list of objects, else
    400 naming the field): a server an upstream honouring it would connect to."""
    if servers is None:
        return
    if not isinstance(servers, list):
        raise errors.BadRequest("mcp_servers: must be a list of MCP server objects",
                                param="mcp_servers", code="invalid_mcp_servers")
    for i, server in enumerate(servers):
        if not isinstance(server, dict):
            raise errors.BadRequest(f"mcp_servers[{i}]: must be an object (type, url, name)",
                                    param=f"mcp_servers[{i}]", code="invalid_mcp_servers")
        check(server.get("url"), f"mcp_servers[{i}].url", policy)


def _check_anthropic(messages: Any, policy: Policy) -> None:
    """vLLM's own Messages translation (served natively) fetches an ``image`` block's
    ``url`` source, also inside a ``tool_result``'s content, which Synapse's translation
    drops (``core.anthropic_request``), so its check on the translation misses it."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(block, dict):
                continue
            where = f"messages[{i}].content[{j}]"
            _check_source(block, where, policy)
            inner = block.get("content") if block.get("type") == "tool_result" else None
            for k, item in enumerate(inner if isinstance(inner, list) else ()):
                if isinstance(item, dict):
                    _check_source(item, f"{where}.content[{k}]", policy)


def _check_source(block: dict[str, Any], where: str, policy: Policy) -> None:
    source = block.get("source") if block.get("type") == "image" else None
    if isinstance(source, dict) and source.get("type") == "url":
        check(source.get("url"), f"{where}.source.url", policy)


def _check_anywhere(value: Any, where: str, policy: Policy) -> None:
    """Every dict in ``value`` as a part (small request fields; depth is bounded by
    ``http.max_json_depth``)."""
    if isinstance(value, dict):
        _check_part(value, where, policy)
        for key, inner in value.items():
            if isinstance(inner, (dict, list)):
                _check_anywhere(inner, f"{where}.{key}", policy)
    elif isinstance(value, list):
        for j, inner in enumerate(value):
            if isinstance(inner, (dict, list)):
                _check_anywhere(inner, f"{where}[{j}]", policy)


def _check_parts(parts: list[Any], where: str, policy: Policy) -> None:
    for j, part in enumerate(parts):
        if isinstance(part, dict):
            _check_part(part, f"{where}[{j}]", policy)


def _check_part(part: dict[str, Any], where: str, policy: Policy) -> None:
    """Every URL-bearing key, whatever ``type`` says (module docstring)."""
    for key in _URL_KEYS:
        if key in part:
            value = part[key]
            url = value.get("url") if isinstance(value, dict) else value
            check(url, f"{where}.{key}", policy)


def check(url: object, field: str, policy: Policy) -> None:
    """Refuse (400, naming ``field``) ``url`` unless ``policy`` allows it."""
    if policy == "any" or url is None:
        return
    if not isinstance(url, str):
        raise _refused(field, "must be a URL string")
    if url[:5].lower() == "data:":      # vLLM's own test for an inline URL
        return
    if policy == "inline":
        raise _refused(field, "must be a data: URL (http.media_urls is inline)")
    scheme, _, rest = url.partition(":")
    if scheme.lower() not in ("http", "https") or not rest.startswith("//"):
        raise _refused(field, "must be a data:, http: or https: URL")
    if len(url) > MAX_URL:
        raise _refused(field, f"is longer than {MAX_URL} characters")
    if "\\" in url or any(c <= " " or c == "\x7f" for c in url):
        # parsers disagree on these (a backslash ends the host for browsers' parser,
        # not for Python's): what is checked must be what the engine fetches
        raise _refused(field, "contains a backslash, a space or a control character")
    _check_host(url, field)


def _check_host(url: str, field: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise _refused(field, "is not a valid URL") from None
    if "@" in parts.netloc:
        raise _refused(field, "carries credentials (user@host)")
    if "%" in parts.netloc:
        # the engine's parser (urllib3) decodes it: 127%2e0%2e0%2e1 is 127.0.0.1
        raise _refused(field, "percent-encodes its host")
    try:
        host = _normalised(host)
    except UnicodeError:
        raise _refused(field, "names a host that is not a valid name") from None
    if not host:
        raise _refused(field, "names no host")
    if _internal(host):
        raise _refused(field, "points to an internal address, which the engine would "
                              "fetch from inside the cluster (http.media_urls)")


def _normalised(host: str) -> str:
    """``host`` as the fetcher connects to it: lower case, no trailing dot, and a non-ASCII
    host as Python's idna codec encodes it (NFKC, IDNA's full stops, nameprep per label;
    UnicodeError when nameprep refuses a label)."""
    host = host.lower()
    if not host.isascii():
        mapped = unicodedata.normalize("NFKC", host).translate(_DOTS)
        labels = [encodings.idna.nameprep(label) if label else label
                  for label in mapped.split(".")]
        # nameprep folds case and applies NFKC again: a dot it made counts too
        host = unicodedata.normalize("NFKC", ".".join(labels)).translate(_DOTS)
    return host.rstrip(".")


def _internal(host: str) -> bool:
    if host == "localhost" or host.endswith(_INTERNAL_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return _legacy_ipv4(host)
    if isinstance(address, ipaddress.IPv6Address):
        return _internal_ipv6(address)
    return _internal_address(address)


def _internal_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not address.is_global or address.is_multicast


def _internal_ipv6(address: ipaddress.IPv6Address) -> bool:
    """Internal itself, or carrying an internal IPv4 address: a host or gateway reaches
    that IPv4 address for it (Python's ``is_global`` counts ``::7f00:1`` global)."""
    if int(address) >> 80 == 0x64_ff9b_0001:   # local-use NAT64 (RFC 8215): inside by design
        return True
    embedded = carried_ipv4(address)
    if _internal_address(address) and embedded is None:
        return True
    return embedded is not None and _internal_address(embedded)


def carried_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``address`` carries, which a host or gateway reaches for it:
    mapped ``::ffff:0:0/96``, SIIT ``::ffff:0:0:0/96``, NAT64 ``64:ff9b::/96`` (RFC 6052),
    6to4 ``2002::/16``, IPv4-compatible ``::/96`` (not ``::`` and ``::1``, which are the
    unspecified and loopback addresses); None for any other. The one home of these forms
    (media URLs here, and the hosts an agent reports, :mod:`engine_hosts`)."""
    embedded = address.ipv4_mapped or address.sixtofour
    value = int(address)
    if embedded is None and value > 1 and (
            value >> 32 in (0, 0xffff_0000)                 # compatible, SIIT
            or value >> 32 == 0x64_ff9b << 64):             # NAT64 (RFC 6052)
        embedded = ipaddress.IPv4Address(value & 0xffff_ffff)
    return embedded


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
