"""Builds the flat batch for a scheduled step, runs the model over the paged KV cache, samples."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.scheduler import ScheduledBatch
from pdserve.model.attention import AttentionMetadata, PrefillSpan


class ModelRunner:
    def __init__(
        self, model: nn.Module, kv_cache: torch.Tensor, block_size: int, vocab_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(device, vocab_size)
        # Write-mode seam: called with (layer index, batch) once a layer's KV is in the cache.
        self.layer_hook: Callable[[int], None] | None = None

    def _slots(self, req: Request, start: int, end: int) -> list[int]:
        bs, blocks = self.block_size, req.block_ids
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def build(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat token ids, positions, attention metadata, and the row of each request's last token."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_rows: list[int] = []
        for req in batch.decodes:
            p = req.num_computed_tokens
            tokens.append(req.token_ids(p, p + 1)[0])
            positions.append(p)
            slots.extend(self._slots(req, p, p + 1))
            last_rows.append(len(tokens) - 1)
        max_blocks = max((len(r.block_ids) for r in batch.decodes), default=0)
        tables = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in batch.decodes]
        spans: list[PrefillSpan] = []
        for req, n in batch.prefills:
            p = req.num_computed_tokens
            spans.append(
                PrefillSpan(
                    q_start=len(tokens),
                    q_len=n,
                    num_cached=p,
                    block_ids=torch.tensor(req.block_ids, dtype=torch.long, device=self.device),
                )
            )
            tokens.extend(req.token_ids(p, p + n))
            positions.extend(range(p, p + n))
            slots.extend(self._slots(req, p, p + n))
            last_rows.append(len(tokens) - 1)
        dev = self.device
        meta = AttentionMetadata(
            block_size=self.block_size,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode_tokens=len(batch.decodes),
            decode_block_tables=torch.tensor(tables, dtype=torch.long, device=dev).view(len(tables), max_blocks),
            decode_context_lens=torch.tensor(
                [r.num_computed_tokens + 1 for r in batch.decodes], dtype=torch.long, device=dev
            ),
            prefills=spans,
            layer_hook=self.layer_hook,
        )
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta, last_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[str, int]:
        """Run one step; returns request id -> sampled token for every request in the batch."""
        ids, pos, meta, last_rows = self.build(batch)
        hidden = self.model(ids, pos, self.kv_cache, meta)
        rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        reqs = batch.decodes + [r for r, _ in batch.prefills]
        sampled = self.sampler(logits, self.sampler.prepare(reqs)).tolist()
        return {r.request_id: t for r, t in zip(reqs, sampled, strict=True)}
