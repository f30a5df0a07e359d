"""Attention over the paged KV cache.

KV cache layout (one allocation for all layers; on CPU optionally a shared-memory segment):

    kv_cache: [num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim]
                  │            │       │       │            │
                  │            │       │       │            └─ token slot inside the block
                  │            │       │       └─ KV head: a head's 16 tokens are one 4 KiB run (bf16, hd 128)
                  │            │       └─ 0 = K, 1 = V
                  │            └─ block id (what the block pool hands out)
                  └─ layer

so one block of one layer (K and V together) is one contiguous span of
2 * num_kv_heads * block_size * head_dim elements: what KV transports move. Head-major inside the
block so that gathering a sequence's blocks per head copies whole runs of block_size * head_dim,
not head_dim-sized pieces (the decode gather on CPU is ~1.7x faster this way).

A batch is flat: the first `num_decode_tokens` tokens are decodes (one token per sequence), the
rest are prefill chunks, each a contiguous span of tokens of one sequence.

Kernels by device: on CUDA, decode attention is the paged Triton kernel of triton_decode.py (reads
only each sequence's live blocks, static grid: CUDA-graph safe) and prefill attention is SDPA
(FlashAttention) over the chunk; on CPU, where Triton is missing, and for models that soft-cap the
attention scores (Gemma 2: scores = cap * tanh(scores / cap), which neither the kernel nor SDPA
does), both are the batched-GEMM torch code below.

Sliding windows: a layer with window w lets the query at position i see the keys at positions
i - w < j <= i (transformers' mask). Every path takes the layer's window: the torch decode masks
keys before context_len - w, the Triton kernel starts each sequence's loop at its window,
the blocked prefill masks per query row and skips the keys before its query block's window, and
a prefill chunk the window cuts into goes through SDPA with an explicit boolean mask (the memory-
efficient kernel, not FlashAttention, which takes no mask). Both prefill paths gather only the
cached blocks from the first one the chunk's window reaches. The window is a per-layer constant,
so CUDA graphs captured with it stay valid.

FP8 KV cache (kv_quant.py): a float8 cache stores x / scale per layer (KVScales); write_kv quantizes
and every read dequantizes — the gather (decode, multi-query rows and cached prefill context) into
its compute-dtype copy, the Triton kernel as it loads. A prefill chunk with nothing cached before it
attends to its own K/V as computed (as vLLM's prefill does), so only cached context is read back
rounded.

Speculative rows (a decoding sequence's last token and its drafts, engine/runner.py) are prefill
spans of 1 + d tokens. On CUDA each goes through the prefill path (SDPA) like any chunk; elsewhere
(`multi_query_supported`) the runner adds a MultiQueryRows to the metadata, and the step's decode
rows and speculative rows are attended together by the decode path's one gather + batched matmul,
with up to Q = 1 + d queries per sequence and a per-query causal mask: one set of small ops per
layer instead of one per speculative row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pdserve.engine.staging import to_device
from pdserve.model import triton_decode
from pdserve.model.kv_quant import KVScales, gather_dequantized, is_fp8, quantize


@dataclass(frozen=True)
class PrefillSpan:
    """One prefill chunk in the flat batch."""

    q_start: int  # offset of the chunk's first token in the flat batch
    q_len: int  # tokens in this chunk
    num_cached: int  # tokens of this sequence already in the cache before the chunk
    block_ids: torch.Tensor  # [num_blocks_of_seq] long: the sequence's block table


def multi_query_supported(device: torch.device) -> bool:
    """Whether attention on `device` takes decode and speculative rows together (MultiQueryRows):
    the torch path everywhere but CUDA, which keeps its paged Triton decode kernel and SDPA per span."""
    return device.type != "cuda"


class QueryRow(NamedTuple):
    """One sequence's queries in the flat batch, for MultiQueryRows.of: the last q_len tokens of its
    context, at flat rows q_start .. q_start + q_len - 1."""

    q_start: int
    q_len: int  # 1 for a decode, 1 + d for a speculative row with d drafts
    context_len: int  # the sequence's tokens through its last query (all in the cache by then)
    block_ids: list[int]


@dataclass
class MultiQueryRows:
    """Decode rows and speculative rows of one step, attended together: the decode path's gather +
    batched matmul with up to Q queries per sequence instead of one (see `_multi_query_attention`).

    Row s's q_s queries are right-aligned in Q = max(q_s) slots. Slot j holds position
    ctx_s - q_s + max(0, j - (Q - q_s)): the slots before a row's first query repeat that query
    (computed, never written back), so every slot sees at least one key and no row is all -inf.
    Each slot sees the keys at positions <= its own (and, with a window w, > its own - w):

        Q = 5            slot:  0    1    2    3    4
        decode row (q = 1):     t    t    t    t    t      the pads repeat t (position ctx - 1)
        4 drafts (q = 5):       t    d1   d2   d3   d4     positions ctx - 5 .. ctx - 1
        2 drafts (q = 3):       t    t    t    d1   d2

        keys of the 4-draft row:  0 .. ctx-6 | ctx-5 ctx-4 ctx-3 ctx-2 ctx-1 | table padding
        slot 0 (t)                x  ..  x   |   x     .     .     .     .   |   .
        slot 1 (d1)               x  ..  x   |   x     x     .     .     .   |   .
        slot 4 (d4)               x  ..  x   |   x     x     x     x     x   |   .

    Invariant (what paged_attention relies on): when AttentionMetadata.multi_query is set it covers
    every decode row of the step and the entries of `prefills` listed in `span_indices`.
    """

    q_index: torch.Tensor  # [S * Q] long: the flat-batch row of each slot's query
    q_positions: torch.Tensor  # [S, Q] long: each slot's position
    block_tables: torch.Tensor  # [S, max_blocks] long, padded with block 0
    out_slots: torch.Tensor  # [N] long: the slots that hold real queries (N = sum of q_s) ...
    out_rows: torch.Tensor  # [N] long: ... and their flat-batch rows
    span_indices: frozenset[int]  # the AttentionMetadata.prefills entries these rows attend
    _biases: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by window

    @classmethod
    def of(cls, rows: Sequence[QueryRow], span_indices: Iterable[int], device: torch.device) -> MultiQueryRows:
        """The slots of `rows` (at least one), covering the prefill spans `span_indices`."""
        nq = max(r.q_len for r in rows)
        width = max(len(r.block_ids) for r in rows)
        q_index: list[int] = []
        q_pos: list[list[int]] = []
        out_slots: list[int] = []
        out_rows: list[int] = []
        for s, r in enumerate(rows):
            pad = nq - r.q_len
            queries = [max(0, j - pad) for j in range(nq)]  # the row's query in each slot
            q_index += [r.q_start + i for i in queries]
            q_pos.append([r.context_len - r.q_len + i for i in queries])
            out_slots += range(s * nq + pad, (s + 1) * nq)
            out_rows += range(r.q_start, r.q_start + r.q_len)
        tables = [r.block_ids + [0] * (width - len(r.block_ids)) for r in rows]
        return cls(
            q_index=to_device(q_index, torch.long, device),
            q_positions=to_device(q_pos, torch.long, device),
            block_tables=to_device(tables, torch.long, device),
            out_slots=to_device(out_slots, torch.long, device),
            out_rows=to_device(out_rows, torch.long, device),
            span_indices=frozenset(span_indices),
        )

    @property
    def num_slots(self) -> int:
        """Q, the slots per row."""
        return self.q_positions.shape[1]

    def bias(self, block_size: int, window: int | None = None) -> torch.Tensor:
        """[S, 1, Q, L] float32 (L = max_blocks * block_size): -inf where a slot does not see a key,
        else 0 (the 1: a KV head's group of query heads, broadcast)."""
        bias = self._biases.get(window)
        if bias is None:
            keys = torch.arange(self.block_tables.shape[1] * block_size, device=self.q_positions.device)
            bias = self._biases[window] = _mask_bias(~_hidden_keys(self.q_positions, keys, window)[:, None])
        return bias


@dataclass
class AttentionMetadata:
    """Per-step facts every attention layer needs; built once per step by the runner."""

    block_size: int
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset, for each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [D, max_blocks] long, padded with block 0
    decode_context_lens: torch.Tensor  # [D] long, context length including the new token
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Decode and speculative rows attended together (multi_query_supported devices, steps with
    # speculative rows); None: decodes by the decode path, every span by the prefill path.
    multi_query: MultiQueryRows | None = None
    # Called with the layer index once that layer's KV for this step is in the cache (write-mode seam).
    layer_hook: Callable[[int], None] | None = None
    # Derived once per step, shared by every layer.
    _k_index: torch.Tensor | None = None
    _v_index: torch.Tensor | None = None
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by window
    _decode_biases: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by window

    def kv_write_indices(self, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices ([T * kvh]) of this step's K and V rows in a layer's cache viewed as
        [num_blocks * 2 * kvh * block_size, head_dim], token-major then head (k.reshape(-1, hd)'s order)."""
        if self._k_index is None:
            bs = self.block_size
            blk = torch.div(self.slot_mapping, bs, rounding_mode="floor")
            off = self.slot_mapping - blk * bs
            heads = torch.arange(num_kv_heads, device=blk.device) * bs
            k_index = (blk * (2 * num_kv_heads * bs) + off)[:, None] + heads[None, :]
            self._k_index = k_index.reshape(-1)
            self._v_index = self._k_index + num_kv_heads * bs
        return self._k_index, self._v_index  # type: ignore[return-value]

    def decode_mask(self, window: int | None = None) -> torch.Tensor:
        """[D, 1, 1, L] bool, the keys each decode query sees: position < context length and, with a
        window, position >= context length - window."""
        mask = self._decode_masks.get(window)
        if mask is None:
            n_blocks = self.decode_block_tables.shape[1]
            pos = torch.arange(n_blocks * self.block_size, device=self.decode_context_lens.device)[None, :]
            ctx = self.decode_context_lens[:, None]
            mask = pos < ctx
            if window is not None:
                mask &= pos >= ctx - window
            mask = mask[:, None, None, :]
            self._decode_masks[window] = mask
        return mask

    def decode_bias(self, window: int | None = None) -> torch.Tensor:
        """decode_mask as an additive float32 bias: 0 where a key is seen, -inf elsewhere."""
        bias = self._decode_biases.get(window)
        if bias is None:
            bias = self._decode_biases[window] = _mask_bias(self.decode_mask(window))
        return bias


def _mask_bias(visible: torch.Tensor) -> torch.Tensor:
    """0 where `visible`, -inf elsewhere (float32). Adding it to finite scores gives exactly what
    masked_fill(~visible, -inf) does, and on CPU a broadcast add is ~5x faster than a broadcast
    masked_fill over [kvh, n, G, Q, L] scores."""
    return torch.zeros(visible.shape, dtype=torch.float32, device=visible.device).masked_fill_(~visible, float("-inf"))


def write_kv(
    kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scales: KVScales = KVScales()
) -> None:
    """Scatter this step's k, v ([T, kvh, hd]) into one layer's cache ([nb, 2, kvh, bs, hd]); a float8
    cache stores them quantized with `scales`."""
    kvh, hd = kv_layer.shape[2], kv_layer.shape[-1]
    k_idx, v_idx = meta.kv_write_indices(kvh)
    if is_fp8(kv_layer.dtype):  # index_copy_ has no float8 kernel: move the bytes
        flat = kv_layer.view(torch.uint8).view(-1, hd)
        flat.index_copy_(0, k_idx, quantize(k.reshape(-1, hd), kv_layer.dtype, scales.k).view(torch.uint8))
        flat.index_copy_(0, v_idx, quantize(v.reshape(-1, hd), kv_layer.dtype, scales.v).view(torch.uint8))
        return
    flat = kv_layer.view(-1, hd)
    flat.index_copy_(0, k_idx, k.reshape(-1, hd).to(flat.dtype))
    flat.index_copy_(0, v_idx, v.reshape(-1, hd).to(flat.dtype))


def _gather(
    kv_layer: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype, scales: KVScales = KVScales()
) -> torch.Tensor:
    """K and V of the given blocks in one copy, head-major: [2, kvh, *block_ids.shape[:-1], n*bs, hd],
    in `dtype` (a float8 cache's dequantized with `scales` on the way: kv_quant.gather_dequantized).

    Selecting blocks from a [2, kvh, nb, bs, hd] *view* of the cache writes the result contiguous in
    exactly the layout the matmuls read (per KV head, tokens in order), so the scattered blocks are
    read once, in runs of bs * hd elements, and nothing is copied again.
    """
    if is_fp8(kv_layer.dtype):
        return gather_dequantized(kv_layer, block_ids, dtype, scales)
    nb, _, kvh, bs, hd = kv_layer.shape
    rows = kv_layer.permute(1, 2, 0, 3, 4).index_select(2, block_ids.reshape(-1))
    return rows.view(2, kvh, *block_ids.shape[:-1], block_ids.shape[-1] * bs, hd)


def _softcap_(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """cap * tanh(scores / cap) in place (Gemma 2), or scores unchanged when softcap is None."""
    return scores if softcap is None else scores.div_(softcap).tanh_().mul_(softcap)


def _hidden_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[*q_pos.shape, k] bool, True where the key at k_pos[k] is hidden from the query at q_pos[...]:
    after it, or (with a window) window or more positions before it."""
    q = q_pos[..., None]
    hidden = k_pos > q
    if window is not None:
        hidden |= k_pos <= q - window
    return hidden


def _decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    scales: KVScales = KVScales(),
):
    """q: [D, H, hd] -> [D, H, hd]; grouped-query attention against each sequence's blocks."""
    if q.is_cuda and softcap is None and triton_decode.supported(q, kv_layer):
        return triton_decode.paged_decode_attention(
            q, kv_layer, meta.decode_block_tables, meta.decode_context_lens, scale, window, scales
        )
    return _decode_attention_torch(q, kv_layer, meta, scale, softcap, window, scales)


# Decode sequences per gather on CPU: about this many bytes of K and V at once, so the gathered copy
# is still in cache when the two matmuls read it (one big gather would go out to DRAM and back).
_DECODE_GATHER_BYTES = 4 << 20


def _decode_attention_torch(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    scales: KVScales = KVScales(),
):
    """The gather + matmul form: every block of the (padded) table is read, masked by length (and
    window); in groups of sequences of about _DECODE_GATHER_BYTES of KV each."""
    bias = meta.decode_bias(window)  # [D, 1, 1, L]: one query per sequence
    return _gathered_attention(q[:, None], kv_layer, meta.decode_block_tables, bias, scale, softcap, scales)[:, 0]


def _gathered_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    scales: KVScales = KVScales(),
) -> torch.Tensor:
    """q [n, Q, H, hd], Q queries of each of n sequences, against the blocks of the sequence's row
    of `tables` ([n, max_blocks]); `bias` [n, 1, Q, L] float32 (L = max_blocks * block_size): -inf
    where a query does not see a key, else 0. -> [n, Q, H, hd].

    Per group of sequences (about _DECODE_GATHER_BYTES of KV, so the gathered copy is still in
    cache for the matmuls; one group on CUDA): one gather of their blocks, and per KV head one
    batched GEMM with the group's query heads and slots stacked as rows ([G * Q, hd] x [hd, L]),
    an fp32 softmax, and one GEMM with the values. (The bytes counted are the gathered copy's, in
    q's dtype, whatever the cache's.)"""
    n, nq, h, hd = q.shape
    per_seq = kv_layer[0].numel() * q.element_size() * tables.shape[1]
    step = n if q.is_cuda else max(1, _DECODE_GATHER_BYTES // max(1, per_seq))
    out = torch.empty_like(q)
    for a in range(0, n, step):
        b = min(n, a + step)
        m = b - a
        kv = _gather(kv_layer, tables[a:b], q.dtype, scales)  # [2, kvh, m, L, hd]
        kvh = kv.shape[1]
        g = h // kvh
        # [kvh, m, G * Q, hd] (a view when Q = 1): head-major in the group, then slot.
        qg = q[a:b].view(m, nq, kvh, g, hd).permute(2, 0, 3, 1, 4).reshape(kvh, m, g * nq, hd)
        scores = _softcap_(torch.matmul(qg, kv[0].transpose(-1, -2)).float().mul_(scale), softcap)
        scores.view(kvh, m, g, nq, -1).add_(bias[a:b])
        probs = torch.softmax(scores, dim=-1).to(kv.dtype)
        ctx = torch.matmul(probs, kv[1]).view(kvh, m, g, nq, hd)
        out[a:b].view(m, nq, kvh, g, hd).copy_(ctx.permute(1, 3, 0, 2, 4))
    return out


def _multi_query_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    rows: MultiQueryRows,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    scales: KVScales = KVScales(),
) -> torch.Tensor:
    """The attention of the real queries of `rows` ([N, H, hd], in the order of rows.out_rows): q
    [T, H, hd] is the step's flat batch, whose K/V are already in the cache."""
    s, nq = rows.q_positions.shape
    qs = q.index_select(0, rows.q_index).view(s, nq, *q.shape[1:])
    bias = rows.bias(kv_layer.shape[3], window)
    out = _gathered_attention(qs, kv_layer, rows.block_tables, bias, scale, softcap, scales)
    return out.view(s * nq, *q.shape[1:]).index_select(0, rows.out_slots)


def _chunk_kv(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, span: PrefillSpan, window: int | None,
    scales: KVScales = KVScales(),
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keys and values a chunk attends to, [kvh, L, hd] each, and the position of the first: the
    chunk's own when nothing is cached before it, else the sequence's blocks from the first one its
    window reaches (all of them without a window) to its end (the chunk's K/V are already there)."""
    n, c = k.shape[0], span.num_cached
    if c == 0:
        return k.transpose(0, 1), v.transpose(0, 1), 0
    bs = kv_layer.shape[3]
    first_block = 0 if window is None else max(0, c - window + 1) // bs
    kv = _gather(kv_layer, span.block_ids[first_block : -(-(c + n) // bs)], k.dtype, scales)  # [2, kvh, L, hd]
    first = first_block * bs
    return kv[0, :, : c + n - first], kv[1, :, : c + n - first], first


# Queries per block of the prefill attention: the block's fp32 scores stay cache-sized, and keys
# beyond the block's last query, or before its first query's window (all masked), are skipped.
_QUERY_BLOCK = 64


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    span: PrefillSpan,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    scales: KVScales = KVScales(),
) -> torch.Tensor:
    """One chunk: q [n, H, hd]; k, v of the chunk [n, kvh, hd]. Causal over cached + chunk tokens,
    within the window when there is one.

    Batched GEMMs per KV head (a group's query heads stacked as rows) and an fp32 softmax, in
    blocks of queries. On this CPU it is ~5x faster than the fused SDPA kernel for bf16 GQA, and
    never materialises an n x n score matrix."""
    n, h, hd = q.shape
    c = span.num_cached
    keys, values, first = _chunk_kv(k, v, kv_layer, span, window, scales)
    kvh = keys.shape[0]
    group = h // kvh
    q4 = q.view(n, kvh, group, hd).permute(1, 2, 0, 3)  # [kvh, G, n, hd]
    out = torch.empty(kvh, group, n, hd, dtype=q.dtype, device=q.device)
    pos = torch.arange(c + n, device=q.device)
    for a in range(0, n, _QUERY_BLOCK):
        b = min(n, a + _QUERY_BLOCK)
        lo = first if window is None else max(first, c + a - window + 1)  # keys lo..c+b-1, by position
        ks, vs = keys[:, lo - first : c + b - first], values[:, lo - first : c + b - first]
        qb = q4[:, :, a:b].reshape(kvh, group * (b - a), hd)
        scores = _softcap_(torch.matmul(qb, ks.transpose(1, 2)).float().mul_(scale), softcap)
        scores = scores.view(kvh, group, b - a, c + b - lo)
        scores.masked_fill_(_hidden_keys(pos[c + a : c + b], pos[lo : c + b], window), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype).view(kvh, group * (b - a), c + b - lo)
        out[:, :, a:b] = torch.matmul(probs, vs).view(kvh, group, b - a, hd)
    return out.permute(2, 0, 1, 3).reshape(n, h, hd)


def _prefill_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    span: PrefillSpan,
    scale: float,
    window: int | None = None,
    scales: KVScales = KVScales(),
) -> torch.Tensor:
    """The same as _prefill_attention through F.scaled_dot_product_attention (FlashAttention on CUDA).

    KV heads are repeated to the query heads (a copy of the chunk's keys: small next to the
    attention), which every SDPA backend of every torch version accepts. A chunk with cached
    tokens before it needs the causal mask aligned to the bottom right (query i sees keys
    <= c + i), which `causal_lower_right` gives without materialising it. A window that cuts into
    the chunk's context takes an explicit [n, L] boolean mask instead (SDPA's memory-efficient
    kernel; FlashAttention takes none)."""
    n, h, hd = q.shape
    c = span.num_cached
    keys, values, first = _chunk_kv(k, v, kv_layer, span, window, scales)
    group = h // keys.shape[0]
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
    qh = q.transpose(0, 1)[None]  # [1, H, n, hd]
    if window is not None and window < c + n:
        pos = torch.arange(c + n, device=q.device)
        mask = ~_hidden_keys(pos[c:], pos[first:], window)
        out = F.scaled_dot_product_attention(qh, keys[None], values[None], attn_mask=mask, scale=scale)
    elif c == 0:
        out = F.scaled_dot_product_attention(qh, keys[None], values[None], is_causal=True, scale=scale)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, c + n)
        out = F.scaled_dot_product_attention(qh, keys[None], values[None], attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    scales: KVScales = KVScales(),
    kv_stored: bool = False,
) -> torch.Tensor:
    """Store this step's K/V in the cache, then attend. q: [T, H, hd]; k, v: [T, kvh, hd] -> [T, H, hd].
    `softcap`: cap the scaled scores to cap * tanh(scores / cap) before the softmax (Gemma 2).
    `window`: the layer's sliding window (None: full causal attention). `scales`: the layer's
    KV-cache scales, used when the cache is float8. `kv_stored`: the caller has already written
    k and v to the cache (the fused rope kernel, triton_fused.py)."""
    if not is_fp8(kv_layer.dtype):
        scales = KVScales()
    if not kv_stored:
        write_kv(kv_layer, k, v, meta, scales)
    nd = meta.num_decode_tokens
    mq = meta.multi_query
    # A step of decode rows only, or of one prefill span only, returns its kernel's output as it is
    # (no buffer to copy it into).
    if mq is None and not meta.prefills and nd == q.shape[0] > 0:
        return _decode_attention(q, kv_layer, meta, scale, softcap, window, scales)
    if mq is None and nd == 0 and len(meta.prefills) == 1 and meta.prefills[0].q_len == q.shape[0]:
        return _span_attention(q, k, v, kv_layer, meta.prefills[0], scale, softcap, window, scales)
    out = torch.empty_like(q)
    if mq is not None:  # every decode row and the speculative spans (MultiQueryRows' invariant)
        out.index_copy_(0, mq.out_rows, _multi_query_attention(q, kv_layer, mq, scale, softcap, window, scales))
    elif nd:
        out[:nd] = _decode_attention(q[:nd], kv_layer, meta, scale, softcap, window, scales)
    for i, span in enumerate(meta.prefills):
        if mq is not None and i in mq.span_indices:
            continue
        s, e = span.q_start, span.q_start + span.q_len
        out[s:e] = _span_attention(q[s:e], k[s:e], v[s:e], kv_layer, span, scale, softcap, window, scales)
    return out


def _span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    span: PrefillSpan,
    scale: float,
    softcap: float | None,
    window: int | None,
    scales: KVScales,
) -> torch.Tensor:
    """One prefill span's attention (its rows of q, k, v): SDPA on CUDA, the torch path otherwise."""
    if q.is_cuda and softcap is None:
        return _prefill_attention_sdpa(q, k, v, kv_layer, span, scale, window, scales)
    return _prefill_attention(q, k, v, kv_layer, span, scale, softcap, window, scales)
