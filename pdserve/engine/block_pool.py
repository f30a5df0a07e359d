"""Fixed pool of KV blocks: a free list and reference counts. Pure Python."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    """Hands out block ids in [0, num_blocks). Every freed block comes back to the free list."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self.num_reserved = 0  # blocks taken out of circulation for good (reserve)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_usable(self) -> int:
        """Blocks that requests can ever hold: all but the reserved ones."""
        return self.num_blocks - self.num_reserved

    def reserve(self) -> int:
        """Take one free block out of circulation for good and return its id (a scratch block that
        padded rows of a static-shape step write to; no request ever gets it)."""
        (block,) = self.allocate(1)
        self.num_reserved += 1
        return block

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def incref(self, block_ids: Iterable[int]) -> None:
        for b in block_ids:
            if self._ref[b] <= 0:
                raise ValueError(f"incref of free block {b}")
            self._ref[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; a block whose count reaches 0 is free again."""
        for b in block_ids:
            if self._ref[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def check_integrity(self) -> None:
        """Raise AssertionError if the free list and reference counts disagree."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            if b in free:
                assert self._ref[b] == 0, f"free block {b} has ref count {self._ref[b]}"
            else:
                assert self._ref[b] > 0, f"block {b} is neither free nor referenced (leak)"
