"""The simulated KV cache: a pool of fixed-size blocks with a prefix cache over freed ones.

Modelled on vLLM V1's ``BlockPool`` / ``KVCacheManager``, reduced to what a router can
observe:

* Capacity is ``num_blocks`` blocks of ``block_size`` tokens. A block is *in use* while
  a running sequence holds it (reference count > 0), and *free* otherwise.
* A full prompt block, once computed, is registered under its chained hash
  (``synapse_common.tokens.block_hashes``, the same function the control plane's prefix
  index uses). When its last holder finishes, it stays registered as a free but *cached*
  block; a later request whose prompt starts with the same blocks takes them back instead
  of recomputing them (a prefix-cache hit).
* Allocation takes blank free blocks first and then evicts cached free blocks in LRU
  order. Blocks are released tail first, so the end of a prefix is evicted before its
  start (evicting a head block would orphan every block chained after it).
* Usage (``vllm:kv_cache_usage_perc``) counts blocks in use; cached free blocks count as
  free, as in vLLM.

Only prompt blocks are hashed (vLLM also hashes generated blocks; a router predicts from
prompts, so that is what matters here). Two sequences computing the same block at the
same time keep separate copies, and only the first is registered.

Pure and synchronous: no clock, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# A block a sequence holds: the hash it is registered under, or None for a block that is
# not (yet) in the prefix cache.
BlockRef = int | None


class BlockPool:
    """Block accounting plus the prefix cache (hash → reference count, LRU of free ones)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._blank_free = num_blocks
        self._refs: dict[int, int] = {}  # registered hash -> holders
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refs == 0, LRU first

    @property
    def num_free(self) -> int:
        return self._blank_free + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Registered blocks, in use or free."""
        return len(self._refs)

    @property
    def usage(self) -> float:
        return (self.num_blocks - self.num_free) / self.num_blocks

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are in the prefix cache."""
        hits = 0
        for h in hashes:
            if h not in self._refs:
                break
            hits += 1
        return hits

    def free_after_touch(self, hashes: Sequence[int]) -> int:
        """Free blocks left once ``hashes`` (all cached) are taken by a sequence."""
        reclaimed = sum(1 for h in hashes if self._refs[h] == 0)
        return self.num_free - reclaimed

    def touch(self, hashes: Sequence[int]) -> list[BlockRef]:
        """Take cached blocks (prefix hits) for a sequence."""
        for h in hashes:
            refs = self._refs[h]
            if refs == 0:
                del self._evictable[h]
            self._refs[h] = refs + 1
        return list(hashes)

    def allocate(self, n: int) -> list[BlockRef]:
        """``n`` blank blocks; evicts cached free blocks (LRU) when needed."""
        if n > self.num_free:
            raise ValueError(f"cannot allocate {n} blocks, {self.num_free} free")
        blank = min(n, self._blank_free)
        self._blank_free -= blank
        for _ in range(n - blank):
            h, _unused = self._evictable.popitem(last=False)
            del self._refs[h]
        return [None] * n

    def register(self, h: int) -> bool:
        """Register a just-computed block (held by one sequence) under ``h``.

        False when ``h`` is already registered: the caller keeps an unregistered copy.
        """
        if h in self._refs:
            return False
        self._refs[h] = 1
        return True

    def release(self, blocks: Sequence[BlockRef]) -> None:
        """Give back a sequence's blocks, tail first (so tails are evicted first)."""
        for ref in reversed(blocks):
            if ref is None:
                self._blank_free += 1
                continue
            refs = self._refs[ref] - 1
            self._refs[ref] = refs
            if refs == 0:
                self._evictable[ref] = None
