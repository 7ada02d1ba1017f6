"""Which cache entry answered a recent request, per tenant: what feedback acts on.

``POST /v1/cache/feedback`` names a request by its id (``x-request-id``) and says whether
the cached answer was wrong. To act on it the cache must still know, for that tenant,
which entry served that request: this log remembers it.

Design decisions:

- **Per tenant.** A tenant's ids are looked up only among its own hits, so one tenant can
  never act on (or learn about) another's entries, whatever id it sends.
- **Bounded, in count and in bytes.** At most ``per_tenant`` ids per tenant (oldest out
  first) and at most ``tenants`` tenants (the least recently active out first); an id
  older than ``max_age_s`` is forgotten (the entry it names has expired from the cache by
  then; the oldest are dropped as new ones come). Only a semantic hit keeps its texts
  (the pair ``calibrate --from-feedback`` refits on), and only when each is at most
  :data:`PAIR_TEXT_MAX` characters: an exact hit is evicted by its key alone, and a cut
  text would not be the pair the verifier judged (such a verdict still counts and evicts;
  its pair is not recorded). A tenant's kept texts total at most :data:`TEXT_BUDGET`
  characters (its oldest ids out first). Hits cost no tokens: without these bounds one
  tenant repeating a cached request with a long prompt filled the process's memory.
  Feedback on a forgotten id is refused, never guessed.
- **One verdict per request.** :meth:`ServedLog.take` removes the id, so a repeated
  feedback cannot count twice or flip a verdict already acted on.
- In process: an id is known to the replica that served it. Behind several replicas,
  feedback that reaches another replica is refused (404) like a forgotten id. The serving
  workers of one pod share theirs (:attr:`ServedLog.listener`, :mod:`shared_routing`), so
  feedback may reach any process of the pod that served the hit.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Protocol

from synapse_common.clock import Clock

PAIR_TEXT_MAX = 8192            # characters of each text a semantic hit's pair keeps
TEXT_BUDGET = 4 * 1024 * 1024   # characters of texts kept per tenant


@dataclasses.dataclass(frozen=True)
class Served:
    """What answered one request from the cache."""

    tenant: str
    model: str
    layer: str            # "exact" or "semantic"
    query: str            # the request's semantic text (last user message)
    text: str             # the entry's semantic text (the question it was stored for)
    ref: str              # the entry's exact key (its L1 key, its L2 rows' ref)
    l2_scope: str         # the L2 partition searched ("" for exact hits)
    score: float | None   # the verifier's probability (semantic hits)
    similarity: float | None
    verifier: str = ""    # digest of the verifier that gave ``score``
    embedder_id: str = ""
    pair: bool = True     # the texts are kept (see the module's "Bounded")

    def kept(self) -> Served:
        """What the log keeps of it: the texts only for a semantic hit, each short enough."""
        if not self.pair or (self.layer == "semantic" and len(self.query) <= PAIR_TEXT_MAX
                             and len(self.text) <= PAIR_TEXT_MAX):
            return self
        return dataclasses.replace(self, query="", text="", pair=False)

    @property
    def chars(self) -> int:
        return len(self.query) + len(self.text)


class Listener(Protocol):
    """Told of every id remembered and taken (a mesh sharing them with sibling workers)."""

    def served(self, request_id: str, served: Served) -> None: ...

    def taken(self, tenant: str, request_id: str) -> None: ...


class _Ids(collections.OrderedDict[str, tuple[float, Served]]):
    """One tenant's remembered ids, oldest first, and the characters of their texts."""

    chars = 0

    def drop(self, request_id: str) -> tuple[float, Served] | None:
        found = self.pop(request_id, None)
        if found is not None:
            self.chars -= found[1].chars
        return found

    def drop_oldest(self) -> tuple[float, Served]:
        found = self.popitem(last=False)[1]
        self.chars -= found[1].chars
        return found


class ServedLog:
    def __init__(self, per_tenant: int, max_age_s: float, clock: Clock,
                 tenants: int = 10_000) -> None:
        if per_tenant < 1 or tenants < 1:
            raise ValueError("per_tenant and tenants must be at least 1")
        self._per_tenant = per_tenant
        self._max_age = max_age_s
        self._clock = clock
        self._tenants = tenants
        self._by_tenant: collections.OrderedDict[str, _Ids] = collections.OrderedDict()
        self.listener: Listener | None = None

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_tenant.values())

    def chars(self) -> int:
        """The characters of texts kept, all tenants together."""
        return sum(ids.chars for ids in self._by_tenant.values())

    def remember(self, request_id: str, served: Served) -> None:
        served = served.kept()
        ids = self._by_tenant.get(served.tenant)
        if ids is None:
            ids = self._by_tenant[served.tenant] = _Ids()
            while len(self._by_tenant) > self._tenants:
                self._by_tenant.popitem(last=False)
        self._by_tenant.move_to_end(served.tenant)
        now = self._clock()
        ids.drop(request_id)
        ids[request_id] = (now, served)
        ids.chars += served.chars
        while len(ids) > self._per_tenant or ids.chars > TEXT_BUDGET:
            ids.drop_oldest()
        while ids and next(iter(ids.values()))[0] < now - self._max_age:
            ids.drop_oldest()
        if self.listener is not None:
            self.listener.served(request_id, served)

    def take(self, tenant: str, request_id: str) -> Served | None:
        """The entry that served ``request_id`` for ``tenant``, forgotten from now on."""
        ids = self._by_tenant.get(tenant)
        if ids is None:
            return None
        found = ids.drop(request_id)
        if found is None:
            return None
        if self.listener is not None:
            self.listener.taken(tenant, request_id)
        at, served = found
        return served if self._clock() - at <= self._max_age else None
