"""Early freeing of the KV blocks that slid out of the attention window, for models whose every layer
is windowed (Mistral, Phi-3, Qwen with `use_sliding_window` on all layers). Pure Python.

With w the largest window of the layers, the query at position p sees keys at positions > p - w
(model/attention.py). A request's queries never go below its `num_computed_tokens`: chunks and
decodes start there, a speculative row's rejected drafts are past it (it counts verified positions
only), and nothing moves it back short of a preemption, which frees every block anyway. So a block
that lies wholly before num_computed_tokens - w + 1 is read by no later step: it goes back to the
pool (one reference dropped, so a shared block stays with its other holders and a hashed one stays
findable in the prefix cache until evicted), and its slot in the block table names the pool's
padding block, a valid block that every attention path may gather and masks out:

    positions   0 ... 15 | 16 ... 31 | 32 ... 47 | 48 ... 63        block_size 16, w = 20
    table       [pad]      [pad]       [b7]        [b2]            num_computed_tokens = 55
                freed, num_freed_blocks = 2        the next query (55) sees 36..55
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.request import Request


@dataclass
class WindowReclaimer:
    """Frees a request's blocks that no query of it can see any more (`reclaim`)."""

    pool: BlockPool
    block_size: int
    window: int  # the largest window of the model's layers (every layer is windowed)
    padding: int  # the pool's padding block (BlockPool.padding_block)
    num_freed: int = 0  # blocks freed early, lifetime

    def first_live_block(self, req: Request) -> int:
        """The index of the first block a later query of `req` can see."""
        return min(max(0, req.num_computed_tokens - self.window + 1) // self.block_size, len(req.block_ids))

    def reclaim(self, req: Request) -> int:
        """Free the blocks before `first_live_block` that `req` still holds; returns how many."""
        start, end = req.num_freed_blocks, self.first_live_block(req)
        if end <= start:
            return 0
        # Tail first, as Scheduler.release_blocks: the earlier blocks stay cached the longest.
        self.pool.free(reversed(req.block_ids[start:end]))
        req.block_ids[start:end] = [self.padding] * (end - start)
        req.num_freed_blocks = end
        self.num_freed += end - start
        return end - start
