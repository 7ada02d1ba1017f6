"""The prefix index: which prompt blocks each backend probably holds in its KV cache.

Written at dispatch with the chained block hashes of the rendered prompt (the same
``synapse_common.tokens`` functions the engines' prefix caches use), read by the router to
count the prompt tokens a backend would not have to prefill. Because the hashes chain, a
prompt's cached prefix is the run of leading blocks found, stopping at the first miss.

Each backend's set is an LRU capped at that backend's real KV capacity in blocks (from
its reports), never more than ``max_blocks``: an engine evicts least recently used blocks
too, so the index forgets roughly what the engine forgets. A backend that restarted has
lost its cache, so its entry is dropped when its restart count changes.

The hashes themselves come from :class:`BlockHasher`, which memoises them block by block:
hashing is the larger part of routing a long prompt, and prompts repeat their prefixes
(a tenant's system prompt, a conversation's history) from one request to the next.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from synapse_common import tokens as tok

MEMO_BLOCKS = 16_384    # blocks whose hash BlockHasher keeps (about 14 MB at most)


class BlockHasher:
    """``tokens.block_hashes(ids, block_size)``, memoised per block.

    A block's hash depends only on its parent's hash and its own ids, so a block seen
    before under the same parent is looked up (a fraction of hashing it) and only new
    blocks are hashed, as one-block chains seeded with their parent: the result is the
    same tuple. The memo is cleared when it holds ``max_blocks``.
    """

    def __init__(self, max_blocks: int = MEMO_BLOCKS) -> None:
        self._memo: dict[tuple[int, tuple[int, ...]], int] = {}
        self._max_blocks = max_blocks

    def __call__(self, ids: tuple[int, ...], block_size: int, seed: int = 0) -> tuple[int, ...]:
        """The chain's hashes from ``seed`` (a salted prompt's: ``core.cache_salt.seed``)."""
        memo = self._memo
        out = []
        parent = seed
        for start in range(0, len(ids) - len(ids) % block_size, block_size):
            key = (parent, ids[start:start + block_size])
            found = memo.get(key)
            if found is None:
                found = tok.block_hashes(key[1], block_size, parent)[0]
                if len(memo) >= self._max_blocks:
                    memo.clear()
                memo[key] = found
            out.append(found)
            parent = found
        return tuple(out)


class _Backend:
    __slots__ = ("blocks", "capacity", "restarts")

    def __init__(self, capacity: int, restarts: int) -> None:
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.capacity = capacity
        self.restarts = restarts


class PrefixIndex:
    def __init__(self, max_blocks: int) -> None:
        self._max_blocks = max_blocks
        self._backends: dict[str, _Backend] = {}

    def _entry(self, backend: str, capacity_blocks: int, restarts: int) -> _Backend:
        cap = min(self._max_blocks, capacity_blocks) if capacity_blocks > 0 else self._max_blocks
        entry = self._backends.get(backend)
        if entry is None or entry.restarts != restarts:
            entry = self._backends[backend] = _Backend(cap, restarts)
        elif entry.capacity != cap:
            entry.capacity = cap
            self._trim(entry)
        return entry

    @staticmethod
    def _trim(entry: _Backend) -> None:
        blocks = entry.blocks
        while len(blocks) > entry.capacity:
            blocks.popitem(last=False)

    def match(self, backend: str, hashes: Sequence[int]) -> int:
        """Number of leading blocks of ``hashes`` the backend holds."""
        entry = self._backends.get(backend)
        if entry is None:
            return 0
        blocks = entry.blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, backend: str, hashes: Sequence[int], capacity_blocks: int = 0,
               restarts: int = 0) -> None:
        """Record that the backend now holds these blocks (most recently used)."""
        entry = self._entry(backend, capacity_blocks, restarts)
        blocks = entry.blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        self._trim(entry)

    def observe(self, backend: str, capacity_blocks: int, restarts: int) -> None:
        """Apply a backend's reported capacity / restart count without inserting."""
        if backend in self._backends:
            self._entry(backend, capacity_blocks, restarts)

    def size(self, backend: str) -> int:
        entry = self._backends.get(backend)
        return len(entry.blocks) if entry else 0

    def drop(self, backend: str) -> None:
        self._backends.pop(backend, None)
