"""Fixed pool of KV blocks: a free list, reference counts, and the prefix cache's index. Pure Python.

Prefix caching keeps the KV of freed blocks findable by content until the block is handed out
again:

    free list (LRU order)     head ─► [7] [2] [9 h=a1] [4 h=c3] ◄─ tail (freed last)
    cached: {hash -> block}   a1 -> 9, c3 -> 4, f0 -> 5 (5 is in use, ref 2: shared by two requests)

`allocate` pops from the head; a block popped with a hash leaves the index (evicted). A cache hit
(`take_cached`) on a free block takes it off the list; on a used block it adds a reference.
Only full blocks whose every token's KV is computed are registered, so a hit never reads a slot
somebody is still writing, and nobody writes into a registered block (writers only touch the
slots after their cached prefix, which lie in blocks of their own).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    """Hands out block ids in [0, num_blocks). Every freed block comes back to the free list."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # registered block -> its content hash
        self._cached: dict[bytes, int] = {}  # content hash -> block (the inverse of _hash_of)
        self.num_reserved = 0  # blocks taken out of circulation for good (reserve)
        self._padding: int | None = None  # padding_block(), once reserved
        self.num_evictions = 0  # cached blocks handed out for new content, lifetime

    @property
    def num_free(self) -> int:
        """Blocks not held by anyone, cached ones included (they are reclaimed on demand)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_usable(self) -> int:
        """Blocks that requests can ever hold: all but the reserved ones."""
        return self.num_blocks - self.num_reserved

    @property
    def num_cached(self) -> int:
        """Blocks whose content is registered (held or free)."""
        return len(self._cached)

    def reserve(self) -> int:
        """Take one free block out of circulation for good and return its id (a scratch block that
        padded rows of a static-shape step write to; no request ever gets it)."""
        (block,) = self.allocate(1)
        self.num_reserved += 1
        return block

    def padding_block(self) -> int:
        """The reserved block that stands in where a block table has no block of its own: the slots
        of blocks a request freed early (slid out of a sliding window) and the rows of padded
        static-shape steps, which write their KV there. Reserved on the first call, the same block
        after; never handed out, and whatever it holds is only ever read masked."""
        if self._padding is None:
            self._padding = self.reserve()
        return self._padding

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n blocks with a reference count of 1, least recently freed first; their old content is
        forgotten (evicted from the cache)."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash_of.pop(b, None)
            if h is not None:
                del self._cached[h]
                self.num_evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def incref(self, block_ids: Iterable[int]) -> None:
        for b in block_ids:
            if self._ref[b] <= 0:
                raise ValueError(f"incref of free block {b}")
            self._ref[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; a block whose count reaches 0 goes to the tail of the
        free list (a cached one stays findable until it reaches the head and is handed out)."""
        for b in block_ids:
            if self._ref[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # ---- prefix cache ------------------------------------------------------------------------
    def cached_prefix(self, hashes: Iterable[bytes]) -> list[int]:
        """The blocks holding the longest prefix of `hashes` (no references taken)."""
        out = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def take_cached(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each cached block, taking free ones off the free list."""
        for b in block_ids:
            if b not in self._hash_of:
                raise ValueError(f"block {b} is not cached")
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def register(self, block: int, h: bytes) -> None:
        """Record that held `block` now holds the full, computed content named by `h`. When another
        block holds that content already (computed at the same time), the first one stays."""
        if self._ref[block] <= 0:
            raise ValueError(f"register of free block {block}")
        if block in self._hash_of or h in self._cached:
            return
        self._hash_of[block] = h
        self._cached[h] = block

    def reset_cache(self) -> int:
        """Forget the content of every free cached block (vLLM's reset_prefix_cache); blocks held by
        requests stay registered (they may be shared). Returns how many were forgotten."""
        dropped = [b for b in self._hash_of if self._ref[b] == 0]
        for b in dropped:
            del self._cached[self._hash_of.pop(b)]
        return len(dropped)

    def check_integrity(self) -> None:
        """Raise AssertionError if the free list, reference counts and cache index disagree."""
        for b in range(self.num_blocks):
            if b in self._free:
                assert self._ref[b] == 0, f"free block {b} has ref count {self._ref[b]}"
            else:
                assert self._ref[b] > 0, f"block {b} is neither free nor referenced (leak)"
        assert len(self._cached) == len(self._hash_of), "cache index and block hashes differ in size"
        for h, b in self._cached.items():
            assert self._hash_of.get(b) == h, f"cached block {b} does not carry its hash"
