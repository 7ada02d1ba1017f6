"""LRU tables partitioned by tenant: one tenant's writes never evict another's entries (pure).

Tenants are adversaries of each other. A bounded table that all tenants share, with one
global least-recently-used order, lets one tenant's writes push out another's entries:
a denial of service (the other loses its cache hits, its session's backend, its pinned
Responses answer) and a leak (watching its own entries disappear, a tenant reads how
much the others write). So every such table here is split into one partition per
tenant, each with its own bound, and a write evicts only from its writer's partition.

Design decisions:

- **Equal shares of the same totals.** The tenant set is static configuration, so each
  table keeps its configured total and every tenant gets :func:`share` of it: the total
  divided by the number of configured tenants (at least one entry each). Memory stays
  bounded by the totals configured before the split. A share never grows or shrinks at
  run time (that would let one tenant's arrival evict another's entries).
- **Bytes where the caller needs them.** A table may bound each partition's bytes too,
  with the caller's measure of a value (the response cache's L1 does; the router's
  sessions and the Responses pins count entries only).
- **Evictions are returned**, never silent, so a caller that keeps a copy elsewhere (the
  L1's journal) can forget it too.
- A partition left empty is removed, so the table holds no more partitions than tenants
  with entries.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


def share(total: int, tenants: int) -> int:
    """Each tenant's part of a table bounded by ``total`` when ``tenants`` tenants are
    configured: equal parts, at least one (the one rule every partitioned table uses)."""
    return max(1, total // max(1, tenants))


class _Part(Generic[V]):
    __slots__ = ("bytes", "entries")

    def __init__(self) -> None:
        self.entries: collections.OrderedDict[str, V] = collections.OrderedDict()
        self.bytes = 0


class TenantLRU(Generic[V]):
    """Maps of key → value, one per tenant, each least-recently-used first out past its
    share of ``max_entries`` (and of ``max_bytes``, measured by ``size``, when given)."""

    def __init__(self, max_entries: int, tenants: int = 1, max_bytes: int | None = None,
                 size: Callable[[V], int] | None = None) -> None:
        if (max_bytes is None) != (size is None):
            raise ValueError("max_bytes and size go together")
        self.max_entries = share(max_entries, tenants)
        self.max_bytes = share(max_bytes, tenants) if max_bytes is not None else None
        self._size = size
        self._parts: dict[str, _Part[V]] = {}
        self._len = 0
        self._bytes = 0

    def __len__(self) -> int:
        return self._len

    @property
    def bytes_used(self) -> int:
        """The values' bytes in all partitions (0 without a ``size``)."""
        return self._bytes

    def get(self, tenant: str, key: str) -> V | None:
        """``tenant``'s value for ``key``, now its most recently used; None when absent."""
        part = self._parts.get(tenant)
        if part is None:
            return None
        value = part.entries.get(key)
        if value is not None:
            part.entries.move_to_end(key)
        return value

    def peek(self, tenant: str, key: str) -> V | None:
        """Like :meth:`get`, but leaves the order alone."""
        part = self._parts.get(tenant)
        return part.entries.get(key) if part is not None else None

    def put(self, tenant: str, key: str, value: V) -> list[tuple[str, V]]:
        """Set ``key`` for ``tenant`` as its most recent entry; the (key, value) pairs of
        ``tenant``'s own that this evicted, oldest first."""
        part = self._parts.get(tenant)
        if part is None:
            part = self._parts[tenant] = _Part()
        old = part.entries.pop(key, None)
        if old is not None:
            self._account(part, old, -1)
        part.entries[key] = value
        self._account(part, value, 1)
        return self._trim(tenant, part)

    def put_older(self, tenant: str, items: Iterable[tuple[str, V]]) -> list[tuple[str, V]]:
        """Place ``items`` (oldest first) before ``tenant``'s present entries, skipping
        keys it already holds (the present value is newer), then trim to the share: what
        a table read back from disk under newer writes needs. Returns what was evicted."""
        part = self._parts.get(tenant)
        if part is None:
            part = self._parts[tenant] = _Part()
        now = part.entries
        part.entries = collections.OrderedDict((k, v) for k, v in items if k not in now)
        for value in part.entries.values():
            self._account(part, value, 1)
        part.entries.update(now)
        return self._trim(tenant, part)

    def pop(self, tenant: str, key: str) -> V | None:
        """Remove ``key`` of ``tenant``; its value, or None when absent."""
        part = self._parts.get(tenant)
        if part is None:
            return None
        value = part.entries.pop(key, None)
        if value is not None:
            self._account(part, value, -1)
            if not part.entries:
                del self._parts[tenant]
        return value

    def items(self, tenant: str | None = None) -> Iterator[tuple[str, str, V]]:
        """(tenant, key, value) of ``tenant`` (None: of every tenant), as a snapshot that
        may be changed while iterated."""
        tenants = [tenant] if tenant is not None else list(self._parts)
        found = [(t, k, v) for t in tenants if (p := self._parts.get(t)) is not None
                 for k, v in p.entries.items()]
        return iter(found)

    def clear(self) -> None:
        self._parts.clear()
        self._len = self._bytes = 0

    def _account(self, part: _Part[V], value: V, sign: int) -> None:
        self._len += sign
        if self._size is not None:
            n = self._size(value) * sign
            part.bytes += n
            self._bytes += n

    def _trim(self, tenant: str, part: _Part[V]) -> list[tuple[str, V]]:
        evicted: list[tuple[str, V]] = []
        cap_bytes = self.max_bytes
        while part.entries and (len(part.entries) > self.max_entries
                                or (cap_bytes is not None and part.bytes > cap_bytes)):
            key, value = part.entries.popitem(last=False)
            self._account(part, value, -1)
            evicted.append((key, value))
        if not part.entries:
            del self._parts[tenant]
        return evicted
