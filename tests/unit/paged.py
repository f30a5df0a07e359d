"""Helpers to run a model directly over a paged KV cache (flat batch of decodes and prefills)."""

from __future__ import annotations

import torch

from pdserve.engine.kv_cache import KVLayout
from pdserve.model.attention import AttentionMetadata, PrefillSpan
from pdserve.model.loader import LoadedModel

BS = 16  # block size
PROMPT_LEN = 40


def make_meta(
    decodes: list[tuple[list[int], int]], prefills: list[tuple[list[int], int, int]]
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Flat-batch metadata: decodes are (block_ids, position); prefills are (block_ids, num_cached, q_len)."""
    slots: list[int] = []
    positions: list[int] = []
    for blocks, pos in decodes:
        slots.append(blocks[pos // BS] * BS + pos % BS)
        positions.append(pos)
    width = max((len(b) for b, _ in decodes), default=1)
    tables = torch.tensor([b + [0] * (width - len(b)) for b, _ in decodes], dtype=torch.long).view(-1, width)
    ctx = torch.tensor([pos + 1 for _, pos in decodes], dtype=torch.long)
    spans = []
    for blocks, cached, n in prefills:
        spans.append(PrefillSpan(len(slots), n, cached, torch.tensor(blocks)))
        for pos in range(cached, cached + n):
            slots.append(blocks[pos // BS] * BS + pos % BS)
            positions.append(pos)
    meta = AttentionMetadata(BS, torch.tensor(slots), len(decodes), tables, ctx, spans)
    return meta, torch.tensor(positions)


def new_cache(lm: LoadedModel, num_blocks: int = 8) -> torch.Tensor:
    c = lm.config
    layout = KVLayout(c.num_hidden_layers, num_blocks, BS, c.num_key_value_heads, c.head_dim, lm.dtype)
    return torch.zeros(layout.shape, dtype=lm.dtype)


@torch.inference_mode()
def run(
    lm: LoadedModel, ids: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, positions
) -> torch.Tensor:
    hooked: list[int] = []
    meta.layer_hook = hooked.append
    logits = lm.module.compute_logits(lm.module(ids, positions, kv, meta))
    assert hooked == list(range(lm.config.num_hidden_layers))
    assert logits.dtype == torch.float32
    return logits


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < tol
