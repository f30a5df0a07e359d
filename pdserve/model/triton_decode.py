"""Decode attention over the paged KV cache as a Triton kernel (split-KV, "flash-decoding"); CUDA.

Why a kernel of our own rather than the alternatives:

- the torch path (attention.py `_decode_attention`) gathers every block of the table, padded to
  the widest sequence, into a new tensor and then reads it again: about 3x the KV bytes of the
  real contexts, and with a static (CUDA-graph) table padded to max_model_len it reads all of it;
- SDPA has no paged input: it needs the same gather first;
- FlexAttention needs K and V each as one [B, H, L, D] tensor, but our blocks interleave K and V
  ([nb, 2, kvh, bs, hd], the layout KV transports move as one span per block), so no view of the
  cache has that shape: it would need a copy or a change of the cache layout.

This kernel reads each live key and value exactly once, straight from the cache through the block
table, and stops at each sequence's context length, so a table padded to max_model_len (as in the
CUDA graphs) costs nothing beyond the real tokens. Grid: (sequence, KV head, partition of
`partition` keys); each program computes, for the GQA group of query heads sharing its KV head,
the running max, the softmax denominator and the unnormalised output over its keys (fp32);
a second kernel combines the partitions. Both have static grids for a given table width, so they
are captured by CUDA graphs as they are. It also runs on CPU tensors under TRITON_INTERPRET=1,
which is how the unit tests check it without a GPU.

A sliding window w (the layer's, a constant: still CUDA-graph safe) starts each sequence's keys
at context_len - w: a program skips its partition's whole steps of BLOCK_N keys before that and
masks the keys before it in the step that holds it; a partition wholly before it reads nothing and
leaves an empty partial (max -inf, sum 0), which the combine weighs at 0.

A float8 cache (kv_quant.py) is loaded as float8 and converted to q's dtype in the kernel; the
layer's scales are folded into the score scale (k) and the partial outputs (v), so nothing else
changes.
"""

from __future__ import annotations

import torch

from pdserve.model.kv_quant import KVScales, is_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path is used
    triton = None

_BLOCK_N = 64  # keys per inner iteration
_MIN_PARTITION = 128  # keys per program, at least
_MAX_PARTITIONS = 64  # programs per (sequence, KV head), at most: bounds the fp32 partials
# Warps per program of the partial kernel: at head_dim >= 128 four warps spill (ptxas for sm_90:
# 255 registers and a ~560-byte stack per thread, the [BLOCK_N, HEAD_DIM] int64 address tiles of
# K and V); eight do not.
_WIDE_HEAD_WARPS = 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def partition_size(max_tokens: int) -> int:
    """Keys per program for a table of `max_tokens` slots: a power of two >= 128 (a multiple of
    the inner step), with at most 64 partitions."""
    return max(_MIN_PARTITION, _next_pow2(-(-max_tokens // _MAX_PARTITIONS)))


def supported(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """True when the kernel can run these shapes (Triton installed, head_dim a power of two >= 16, the
    cache in q's dtype or float8)."""
    hd = q.shape[-1]
    return (
        triton is not None
        and hd >= 16
        and hd & (hd - 1) == 0
        and (q.dtype == kv_layer.dtype or is_fp8(kv_layer.dtype))
        and kv_layer.stride(-1) == 1
        and q.stride(-1) == 1
    )


if triton is not None:

    # The integers that follow a step's table width or the layer are not specialized on (Triton
    # compiles a variant per value class: == 1, divisible by 16, other), and the combine's partition
    # tile is always the largest: eager steps, whose tables are as wide as their longest sequence,
    # run the kernels the CUDA graphs' warm-up compiled at start (full-width tables) instead of
    # compiling new variants mid-serving, which stalls every request of the step.
    @triton.jit(do_not_specialize=["partition", "num_parts", "window", "stride_td"])
    def _partial_kernel(
        q_ptr,
        kv_ptr,
        table_ptr,
        lens_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        scale,
        v_scale,
        partition,
        num_parts,
        window,
        stride_qd,
        stride_qh,
        stride_kb,
        stride_kv,
        stride_kt,
        stride_kh,
        stride_td,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        ctx = tl.load(lens_ptr + seq)
        start = part * partition
        end = tl.minimum(start + partition, ctx)
        first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # the first key the query sees
        # The loop's first step is the one holding `first` (steps stay BLOCK_N-aligned, as start is).
        lo = tl.maximum(start, first - first % BLOCK_N)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + offs_g
        g_ok = offs_g < GROUP
        q = tl.load(
            q_ptr + seq * stride_qd + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for t0 in range(lo, end, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            t_ok = (offs_t < end) & (offs_t >= first)
            blk = tl.load(table_ptr + seq * stride_td + offs_t // BLOCK_SIZE, mask=t_ok, other=0)
            row = blk.to(tl.int64) * stride_kb + (offs_t % BLOCK_SIZE) * stride_kt + kvh * stride_kh
            k = tl.load(kv_ptr + row[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0).to(q.dtype)
            v = tl.load(kv_ptr + stride_kv + row[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
            v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_N] fp32
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        idx = (seq * tl.num_programs(1) * GROUP + heads) * num_parts + part
        live = g_ok & (start < ctx)  # a partition past the context writes nothing
        tl.store(m_ptr + idx, m_i, mask=live)
        tl.store(l_ptr + idx, l_i, mask=live)
        tl.store(acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc * v_scale, mask=live[:, None])

    @triton.jit(do_not_specialize=["partition", "num_parts"])
    def _combine_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        lens_ptr,
        out_ptr,
        partition,
        num_parts,
        stride_od,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        PARTS_PAD: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        ctx = tl.load(lens_ptr + seq)
        n = (ctx + partition - 1) // partition
        offs_p = tl.arange(0, PARTS_PAD)
        ok = offs_p < n
        base = (seq * tl.num_programs(1) + head) * num_parts
        m = tl.load(m_ptr + base + offs_p, mask=ok, other=float("-inf"))
        den = tl.load(l_ptr + base + offs_p, mask=ok, other=0.0)
        w = tl.where(ok, tl.exp(m - tl.max(m, 0)), 0.0)
        offs_d = tl.arange(0, HEAD_DIM)
        acc = tl.load(acc_ptr + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * den, 0)
        tl.store(out_ptr + seq * stride_od + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    scales: KVScales = KVScales(),
) -> torch.Tensor:
    """q [D, H, hd] against each sequence's first context_lens[d] keys (>= 1) of the blocks in
    block_tables [D, W] (kv_layer [nb, 2, kvh, bs, hd]) -> [D, H, hd]; with a sliding `window`,
    only the last `window` of them. A float8 kv_layer holds K / scales.k and V / scales.v. No host
    sync."""
    d, h, hd = q.shape
    _, _, kvh, bs, _ = kv_layer.shape
    if not is_fp8(kv_layer.dtype):
        scales = KVScales()
    group = h // kvh
    if block_tables.stride(-1) != 1:  # the kernel steps along a row by 1 (no copy for the usual tables)
        block_tables = block_tables.contiguous()
    width = block_tables.shape[1] * bs
    part = partition_size(width)
    num_parts = -(-width // part)
    out = torch.empty_like(q)
    if d == 0:
        return out
    m = torch.empty(d, h, num_parts, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty(d, h, num_parts, hd, dtype=torch.float32, device=q.device)
    sb, skv, sh, st, _ = kv_layer.stride()
    _partial_kernel[(d, kvh, num_parts)](
        q,
        kv_layer,
        block_tables,
        context_lens,
        m,
        lse,
        acc,
        scale * scales.k,
        scales.v,
        part,
        num_parts,
        window or 0,
        q.stride(0),
        q.stride(1),
        sb,
        skv,
        st,
        sh,
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=hd,
        BLOCK_SIZE=bs,
        BLOCK_N=_BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=_WIDE_HEAD_WARPS if hd >= 128 else 4,
    )
    _combine_kernel[(d, h)](
        m,
        lse,
        acc,
        context_lens,
        out,
        part,
        num_parts,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=hd,
        PARTS_PAD=_MAX_PARTITIONS,
    )
    return out
