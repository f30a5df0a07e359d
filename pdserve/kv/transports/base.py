"""What every KV transport does: move whole blocks of the paged cache between two instances.

READ: the consumer pulls blocks of every layer from the producer. WRITE: the producer pushes one
layer's blocks into the consumer's pre-allocated blocks. Block i of the source maps to block i of
the destination list (same token positions on both sides).
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVTransport(Protocol):
    name: str

    def read(self, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str) -> int:
        """Copy every layer of the peer's `src` blocks into our `dst` blocks. Returns bytes moved.
        `request_id` names the grant the peer checks (tcp; `grants.py`)."""
        ...

    def write_layer(
        self, layer: int, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str
    ) -> int:
        """Copy one layer of our `src` blocks into the peer's `dst` blocks. Returns bytes moved."""
        ...

    def close(self) -> None: ...


class TransferError(RuntimeError):
    """A transfer failed: peer gone, link down, bad block ids."""


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Coalesce the (src, dst) block pairs into runs (src_start, dst_start, length) that are
    consecutive on both sides, so each run is one contiguous copy per layer."""
    if len(src) != len(dst):
        raise TransferError(f"block count mismatch: {len(src)} source vs {len(dst)} destination blocks")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def check_ids(block_ids: list[int], num_blocks: int) -> None:
    bad = next((b for b in block_ids if not 0 <= b < num_blocks), None)
    if bad is not None:
        raise TransferError(f"block id {bad} out of range [0, {num_blocks})")


def copy_blocks(
    dst: torch.Tensor, src: torch.Tensor, runs: list[tuple[int, int, int]], layer: int | None = None
) -> None:
    """dst/src: whole caches [L, nb, ...]; copies all layers, or only `layer`. Bytes as they are
    (uint8 views: float8 caches have no copy kernel everywhere)."""
    dst, src = dst.view(torch.uint8), src.view(torch.uint8)
    for s, d, n in runs:
        if layer is None:
            dst[:, d : d + n].copy_(src[:, s : s + n])
        else:
            dst[layer, d : d + n].copy_(src[layer, s : s + n])
