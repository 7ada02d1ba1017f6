"""A request body's JSON: parsed into an object only when its shape is within bounds.

What a body's bytes may be before any field is read: not empty, JSON, an object, at most
``http.max_json_containers`` arrays and objects (counted on the raw bytes, before
parsing: the server's own walks of a body — cache key, media URLs, prompt — take a
Python step per container, so a body of millions of tiny arrays would hold the event
loop for seconds whatever its byte size), nesting at most ``http.max_json_depth`` deep
(the body may be serialised again, and orjson, like most JSON libraries, has a recursion
limit of its own). Nothing here knows a field's name: the rules of the fields are
:mod:`validation`'s, which calls :func:`load` first.

The cost is bounded by the bytes, not by what a tenant packs into them: a body with fewer
brackets than either bound is parsed with no count and no walk (the usual case); up to
``_WALK_MAX_BRACKETS`` are walked for depth after parsing (bounded work); beyond, the
body's bracket skeleton (:func:`_skeleton`, bytes methods only, no step of Python per
value) is counted and measured.
"""

from __future__ import annotations

from typing import Any

import orjson

from controlplane import errors

MAX_DEPTH = 64
MAX_CONTAINERS = 65536
# At most this many brackets, the parsed body is walked for its depth (bounded work);
# beyond (or beyond a lower http.max_json_containers, which the skeleton counts), its
# bracket skeleton is measured with bytes methods (:func:`_skeleton`).
_WALK_MAX_BRACKETS = 4096
_TO_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b'[]{}"')))


def load(raw: bytes, max_depth: int = MAX_DEPTH,
         max_containers: int = MAX_CONTAINERS) -> dict[str, Any]:
    """The body as a JSON object; 400 (``invalid_json``) when it is empty, not JSON, not
    an object, holds more than ``max_containers`` arrays and objects
    (:func:`_count_containers`, before parsing) or nests deeper than ``max_depth``."""
    if not raw:
        raise errors.BadRequest("the request body is empty; send a JSON object",
                                code="invalid_json")
    # Opening brackets, those inside strings too: at least as many as the containers.
    brackets = raw.count(b"[") + raw.count(b"{")
    skeleton = b""
    # Fewer brackets than either bound: neither the count nor a skeleton is needed.
    if brackets > min(max_containers, _WALK_MAX_BRACKETS):
        skeleton = _skeleton(raw)
        _count_containers(skeleton, max_containers)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"the request body is not valid JSON: {exc}",
                                code="invalid_json") from None
    if not isinstance(body, dict):
        raise errors.BadRequest("the request body must be a JSON object",
                                code="invalid_json")
    # A body with fewer brackets than the limit cannot nest deeper (the usual case: no
    # walk); a few more are walked (bounded work), many are measured on the skeleton.
    if brackets > max_depth and not (_nests_within(skeleton, max_depth) if skeleton
                                     else _within_depth(body, max_depth - 1)):
        raise errors.BadRequest(f"the request body nests deeper than {max_depth} levels "
                                "(http.max_json_depth)", code="invalid_json")
    return body


def _skeleton(raw: bytes) -> bytes:
    """The brackets of JSON text ``raw`` outside its strings, as ``(`` and ``)``, made by
    bytes methods only (no step of Python per value). Escaped backslashes, then escaped
    quotes, are cut out (a run of backslashes pairs from its start, as ``replace`` scans),
    so every remaining quote opens or closes a string; all but brackets and quotes are
    deleted; two adjacent quotes (a string with no bracket in it, or one string's end and
    the next one's start) go, which keeps the quotes paired; what is left between
    quotes is inside a string."""
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = raw.translate(_TO_PARENS, _NOT_BRACKETS).replace(b'""', b"")
    return b"".join(shape.split(b'"')[::2]) if b'"' in shape else shape


def _count_containers(skeleton: bytes, max_containers: int) -> None:
    """400 when the body (its :func:`_skeleton`) has more than ``max_containers`` arrays
    and objects: checked before the body is parsed, so such a body costs no objects."""
    containers = len(skeleton) // 2
    if containers > max_containers:
        raise errors.BadRequest(
            f"the request body has {containers} arrays and objects; at most "
            f"{max_containers} (http.max_json_containers)", code="invalid_json")


def _nests_within(shape: bytes, levels: int) -> bool:
    """Whether a balanced skeleton of ``(`` and ``)`` nests at most ``levels`` deep: each
    pass removes every innermost pair, so one ``levels`` deep is empty after ``levels``."""
    for _ in range(levels):
        shape = shape.replace(b"()", b"")
        if not shape:
            return True
    return not shape


def _within_depth(value: dict[str, Any] | list[Any], levels_left: int) -> bool:
    """Whether every array or object inside ``value`` is at most ``levels_left`` deeper."""
    for item in value.values() if type(value) is dict else value:
        if type(item) is dict or type(item) is list:
            if levels_left <= 0 or not _within_depth(item, levels_left - 1):
                return False
    return True
