"""Fused elementwise kernels of the decoder layer, in Triton; CUDA (and TRITON_INTERPRET=1 in tests).

Eager torch runs a Qwen3 layer's small ops as ~28 kernels: four RMSNorms, rope's seven ops per
tensor (mul, mul, sub, mul, mul, add, cat), two index_copy KV writes with the copies their
reshapes make, the residual adds, silu and mul. At decode batch 1 on an H200 those took 1.7 ms
of a 6.2 ms step (benchmarks/results/gpu_profile_h200_2026-11-27.json) against 4.2 ms of GEMMs:
each is a launch and a round trip through HBM for a few KB. Here they are three kernels:

- `add_rms_norm`: residual + delta (rounded to the dtype, as torch's add), then RMSNorm of the
  sum; the sum is returned too (the residual stream). Without a delta, a plain RMSNorm.
- `qk_norm_rope_`: over the fused q/k/v projection's output [T, (H + 2 KVH) * hd], per head
  row: q/k RMSNorm (Qwen3, Gemma 3), rotary embedding, in place; then K and V straight into the
  paged cache at the step's slots (what attention.write_kv does).
- `silu_mul`: silu(gate) * up over the fused gate/up output.

Numerics follow the torch path they replace: statistics in float32; a non-Gemma norm rounds the
normalized value to the dtype before the weight (torch's rms_norm and HF's RMSNorm); Gemma's
(1 + weight) norm stays in float32 until its one rounding; silu is rounded before the product.
Rope is computed in float32 from the dtype's cos/sin and rounded once (the torch path rounds each
product), so bf16 outputs may differ by an ulp; float32 agrees to rounding.

One program per row (per head row for rope): grids depend on T only, so CUDA graphs capture them.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch ops run instead
    triton = None


def available(x: torch.Tensor) -> bool:
    """True when these kernels run on x's device: Triton installed and x on a CUDA device (the
    interpreter's CPU runs are for tests, which call the kernels directly)."""
    return triton is not None and x.is_cuda


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, d_ptr, w_ptr, sum_ptr, y_ptr, n, eps,
        HAS_DELTA: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64) * n
        offs = tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + row + offs, mask=ok, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(d_ptr + row + offs, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row + offs, x, mask=ok)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            y = xf * rstd * (1.0 + w)
        else:
            y = (xf * rstd).to(x.dtype).to(tl.float32) * w
        tl.store(y_ptr + row + offs, y.to(x.dtype), mask=ok)

    @triton.jit
    def _norm_rope_row(
        x1, x2, w_ptr, offs, ok, eps, HD: tl.constexpr, UNIT_OFFSET: tl.constexpr, dtype: tl.constexpr
    ):
        # RMSNorm of one head row held as its two halves (float32 in and out).
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HD + eps)
        w1 = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HD // 2 + offs, mask=ok, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            return x1 * rstd * (1.0 + w1), x2 * rstd * (1.0 + w2)
        y1 = (x1 * rstd).to(dtype).to(tl.float32) * w1
        y2 = (x2 * rstd).to(dtype).to(tl.float32) * w2
        return y1.to(dtype).to(tl.float32), y2.to(dtype).to(tl.float32)

    @triton.jit
    def _qk_norm_rope_kernel(
        qkv_ptr, stride_t, cos_ptr, sin_ptr, stride_cs, qw_ptr, kw_ptr, eps,
        kv_ptr, slot_ptr, block_size, stride_kb, stride_kv, stride_kh, stride_kt,
        H, KVH,
        HD: tl.constexpr, HALF_PAD: tl.constexpr, HAS_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr,
        WRITE_KV: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)  # q heads [0, H), k heads [H, H + KVH), v heads after
        row = qkv_ptr + t * stride_t + h * HD
        offs = tl.arange(0, HALF_PAD)
        ok = offs < HD // 2
        dtype = qkv_ptr.dtype.element_ty
        if h < H + KVH:
            x1 = tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(row + HD // 2 + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_NORM:
                if h < H:
                    x1, x2 = _norm_rope_row(x1, x2, qw_ptr, offs, ok, eps, HD, UNIT_OFFSET, dtype)
                else:
                    x1, x2 = _norm_rope_row(x1, x2, kw_ptr, offs, ok, eps, HD, UNIT_OFFSET, dtype)
            cos = tl.load(cos_ptr + t * stride_cs + offs, mask=ok, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + t * stride_cs + offs, mask=ok, other=0.0).to(tl.float32)
            o1 = (x1 * cos - x2 * sin).to(dtype)
            o2 = (x2 * cos + x1 * sin).to(dtype)
            tl.store(row + offs, o1, mask=ok)
            tl.store(row + HD // 2 + offs, o2, mask=ok)
            if WRITE_KV and h >= H:
                slot = tl.load(slot_ptr + t)
                dst = kv_ptr + (slot // block_size) * stride_kb + (h - H) * stride_kh + (slot % block_size) * stride_kt
                tl.store(dst + offs, o1, mask=ok)
                tl.store(dst + HD // 2 + offs, o2, mask=ok)
        elif WRITE_KV:
            slot = tl.load(slot_ptr + t)
            dst = kv_ptr + (slot // block_size) * stride_kb + stride_kv + (h - H - KVH) * stride_kh
            dst += (slot % block_size) * stride_kt
            tl.store(dst + offs, tl.load(row + offs, mask=ok), mask=ok)
            tl.store(dst + HD // 2 + offs, tl.load(row + HD // 2 + offs, mask=ok), mask=ok)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(gu_ptr + t * 2 * n + offs, mask=ok, other=0.0)
        u = tl.load(gu_ptr + t * 2 * n + n + offs, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out_ptr + t * n + offs, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, unit_offset: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight) over the last dim; without delta, (x, rms_norm(x))."""
    n = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    total = x if delta is None else torch.empty_like(x)
    d = x if delta is None else delta.contiguous()
    rows = x.numel() // n
    if rows:
        block = _pow2(n)
        _add_rms_norm_kernel[(rows,)](
            x, d, weight, total, y, n, eps,
            HAS_DELTA=delta is not None, UNIT_OFFSET=unit_offset, BLOCK=block, num_warps=_warps(block),
        )
    return total, y


def qk_norm_rope_supported(qkv: torch.Tensor, head_dim: int, rotary_half: int) -> bool:
    """The kernel's shapes: the rotation covers the whole head and rows are contiguous."""
    return rotary_half * 2 == head_dim and qkv.dim() == 2 and qkv.stride(1) == 1


def qk_norm_rope_(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
    unit_offset: bool,
    kv_layer: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> None:
    """In place on qkv [T, (H + 2 KVH) * hd]: q and k heads normalized by `norms` (q's and k's
    weights; None: no q/k norm) and rotated by cos/sin ([T, 1, hd / 2] views, row stride shared);
    with `kv_layer` ([nb, 2, kvh, bs, hd], qkv's dtype), the rotated k and v are also written to the
    cache at `slot_mapping`."""
    t = qkv.shape[0]
    hd = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    if t == 0:
        return
    qw, kw = norms if norms is not None else (qkv, qkv)
    write = kv_layer is not None
    kv = kv_layer if write else qkv
    slots = slot_mapping if slot_mapping is not None else qkv
    strides = (kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)) if write else (0, 0, 0, 0)
    heads = num_heads + (2 if write else 1) * num_kv_heads
    _qk_norm_rope_kernel[(t, heads)](
        qkv, qkv.stride(0), cos, sin, cos.stride(0), qw, kw, eps,
        kv, slots, kv.shape[3] if write else 1, *strides,
        num_heads, num_kv_heads,
        HD=hd, HALF_PAD=_pow2(hd // 2), HAS_NORM=norms is not None, UNIT_OFFSET=unit_offset, WRITE_KV=write,
        num_warps=1 if hd <= 128 else 2,
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 I] (gate first) -> [T, I]."""
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    gate_up = gate_up.contiguous()
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(2048, _pow2(n))
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block, num_warps=_warps(block))
    return out
