"""Decode-only steps at static shapes, replayed from CUDA graphs (one graph per batch-size bucket).

A decode step of n sequences is padded to the smallest bucket b >= n (batch_buckets) and its block
table to `max_blocks` = ceil(max_model_len / block_size) columns, and its inputs are copied into
static device buffers: from pinned host staging with non_blocking copies, so nothing waits for
the GPU. The step is then one `CUDAGraph.replay()` of the forward pass plus the logits of all b
rows; the runner samples the first n rows. Padded rows are harmless: each is a one-token sequence
at position 0 whose KV goes to a scratch block (reserved in the block pool, never handed to a
request) and whose logits are dropped.

The same code runs without graphs (`use_graphs=False`): eagerly at the same static shapes, on any
device, which is how the CPU unit tests prove a padded step gives the tokens of the normal path.
Graph-safety rests on the model doing no host sync and no allocation-dependent control flow in a
decode step: true of the dense Qwen3 model with the Triton decode kernel (attention.py); the MoE
model syncs (expert counts) and so never takes this path. A fresh AttentionMetadata is built for
every warm-up and capture, so its lazily derived index tensors are computed inside the graph.
Decode-only steps call no KV-connector layer hook: connectors only push prefill chunks.

Host staging is reused every step: safe because each step ends with the sampled ids' `.tolist()`,
a host sync that orders the next step's writes after this step's copies.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.engine.request import Request
from pdserve.model.attention import AttentionMetadata


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then every 8 up to 64, then every 32; the last is max_num_seqs."""
    sizes = [1, 2, 4, *range(8, 65, 8)]
    sizes += range(96, max_num_seqs + 1, 32)
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class StaticDecoder:
    """Runs decode-only steps of up to `max_batch_size` sequences at bucketed static shapes."""

    def __init__(
        self,
        model: nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        scratch_block: int,
        device: torch.device,
        use_graphs: bool,
    ) -> None:
        if use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = batch_buckets(max_num_seqs)
        self.scratch_block = scratch_block
        self.device = device
        self.use_graphs = use_graphs
        n = self.buckets[-1]
        pin = device.type == "cuda"
        # Rows: token ids, positions, KV slots, context lengths.
        self._host = torch.zeros(4, n, dtype=torch.long, pin_memory=pin)
        self._host_tables = torch.zeros(n * self.max_blocks, dtype=torch.long, pin_memory=pin)
        self._inputs = torch.zeros(4, n, dtype=torch.long, device=device)
        self._tables = torch.full((n, self.max_blocks), scratch_block, dtype=torch.long, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._stage_padding(n)

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def accepts(self, reqs: list[Request]) -> bool:
        """True when these decodes fit the static shapes (batch and block-table width)."""
        return 0 < len(reqs) <= self.buckets[-1] and max(len(r.block_ids) for r in reqs) <= self.max_blocks

    def bucket(self, n: int) -> int:
        """The padded batch size of an n-sequence step."""
        return next(b for b in self.buckets if b >= n)

    # ---- inputs ---------------------------------------------------------------------------------
    def _pad_rows(self, b: int, n: int) -> list[list[int]]:
        pad = b - n
        return [[0] * pad, [0] * pad, [self.scratch_block * self.block_size] * pad, [1] * pad]

    def _stage_padding(self, b: int) -> None:
        """Every row of the first b a padding row (for warm-up and capture)."""
        self._host[:, :b] = torch.tensor(self._pad_rows(b, 0), dtype=torch.long)
        self._inputs.copy_(self._host)
        self._tables.fill_(self.scratch_block)

    def _stage(self, reqs: list[Request]) -> int:
        """Write the step's inputs to the static buffers; returns the bucket."""
        n = len(reqs)
        b = self.bucket(n)
        bs = self.block_size
        cols: list[list[int]] = [[], [], [], []]
        for r in reqs:
            p = r.num_computed_tokens
            cols[0].append(r.token_ids(p, p + 1)[0])
            cols[1].append(p)
            cols[2].append(r.block_ids[p // bs] * bs + p % bs)
            cols[3].append(p + 1)
        for col, pad in zip(cols, self._pad_rows(b, n), strict=True):
            col.extend(pad)
        self._host[:, :b] = torch.tensor(cols, dtype=torch.long)
        # Only the live columns are copied: columns past a row's context length are never read
        # (the Triton kernel stops at the length; the torch path masks them, and every stale id in
        # them is a valid block id).
        width = max(len(r.block_ids) for r in reqs)
        fill = [self.scratch_block] * width
        rows = [r.block_ids + fill[len(r.block_ids) :] for r in reqs] + [fill] * (b - n)
        tables = self._host_tables[: b * width].view(b, width)
        tables.copy_(torch.tensor(rows, dtype=torch.long))
        self._inputs.copy_(self._host, non_blocking=True)
        self._tables[:b, :width].copy_(tables, non_blocking=True)
        return b

    # ---- forward ----------------------------------------------------------------------------------
    def _forward(self, b: int) -> torch.Tensor:
        """Logits [b, vocab] of the first b staged rows (fresh metadata: derived tensors in-graph)."""
        ids, pos, slots, lens = self._inputs[:, :b]
        meta = AttentionMetadata(
            block_size=self.block_size,
            slot_mapping=slots,
            num_decode_tokens=b,
            decode_block_tables=self._tables[:b],
            decode_context_lens=lens,
        )
        hidden = self.model(ids, pos, self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture one graph per bucket, largest first (all share one memory pool).
        Only the scratch block's KV is written."""
        if not self.use_graphs:
            return
        # Warm-up and capture on one side stream (the torch docs' recipe, and what
        # make_graphed_callables does): state that libraries create lazily per stream (cuBLAS /
        # cuBLASLt workspaces are cached per (handle, stream)) is then made by the warm-up, not
        # mid-capture. Replays run on whatever stream is current (the default one).
        stream = torch.cuda.Stream(self.device)
        pool = None
        for b in reversed(self.buckets):
            self._stage_padding(b)  # on the current stream: the side stream waits for it
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(b)  # compiles the Triton kernels, builds the RoPE table, picks GEMMs
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._logits[b] = self._forward(b)
            pool = graph.pool()
            self._graphs[b] = graph
        torch.cuda.synchronize(self.device)

    def run(self, reqs: list[Request]) -> torch.Tensor:
        """Logits [len(reqs), vocab] (float32) of one decode step; writes the step's KV."""
        b = self._stage(reqs)
        graph = self._graphs.get(b)
        if graph is None:
            logits = self._forward(b)
        else:
            graph.replay()
            logits = self._logits[b]
        return logits[: len(reqs)]
