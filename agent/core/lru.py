"""The embedding cache: an LRU bounded both by entry count and by bytes.

Keys are ``(model, sha256(len(scope), scope, text))``: the text itself is not kept
(memory, and prompts may be sensitive). ``scope`` partitions the cache (the agent passes
the tenant: one tenant's entries are never another's hits); its length goes first, so no
other scope and text can hash the same bytes. Values are packed little-endian float32
vectors, exactly the bytes ``Node.Embed`` returns, so a hit costs one dict lookup and a
copy. Byte accounting counts the vector plus a fixed per-entry overhead estimate for the
key and the OrderedDict node, so ``max_bytes`` tracks real memory use closely.

Not thread-safe: it is used from the event loop only.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

ENTRY_OVERHEAD = 200  # bytes: key tuple, digest, OrderedDict node, bytes header


@dataclasses.dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


def text_key(model: str, text: str, scope: str = "") -> tuple[str, bytes]:
    encoded = scope.encode("utf-8")
    digest = hashlib.sha256(len(encoded).to_bytes(4, "big") + encoded)
    digest.update(text.encode("utf-8"))
    return model, digest.digest()


class EmbeddingLru:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: collections.OrderedDict[tuple[str, bytes], bytes] = (
            collections.OrderedDict())
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    @staticmethod
    def _cost(key: tuple[str, bytes], value: bytes) -> int:
        return len(value) + len(key[0]) + ENTRY_OVERHEAD

    def get(self, model: str, text: str, scope: str = "") -> bytes | None:
        key = text_key(model, text, scope)
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, model: str, text: str, vector: bytes, scope: str = "") -> None:
        key = text_key(model, text, scope)
        cost = self._cost(key, vector)
        if cost > self.max_bytes:
            return  # larger than the whole cache: never stored
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= self._cost(key, old)
        self._data[key] = vector
        self._bytes += cost
        self._shrink()

    def _shrink(self) -> None:
        while self._data and (len(self._data) > self.max_entries
                              or self._bytes > self.max_bytes):
            key, value = self._data.popitem(last=False)
            self._bytes -= self._cost(key, value)
            self.evictions += 1

    def evict(self, model: str | None = None) -> int:
        """Drop every entry (of ``model`` when given); returns how many were dropped."""
        if model is None:
            count = len(self._data)
            self._data.clear()
            self._bytes = 0
        else:
            doomed = [k for k in self._data if k[0] == model]
            for key in doomed:
                self._bytes -= self._cost(key, self._data.pop(key))
            count = len(doomed)
        self.evictions += count
        return count

    def stats(self) -> CacheStats:
        return CacheStats(len(self._data), self._bytes, self.max_entries, self.max_bytes,
                          self.hits, self.misses, self.evictions)
