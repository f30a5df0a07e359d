"""The FP8 KV cache (vLLM's `--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2`): its dtypes, per-layer scales,
and the two conversions every attention path goes through.

A layer's keys and values are stored as float8 with one scale each (vLLM's k_scale / v_scale,
1.0 unless the checkpoint has them):

    store   q = cast(clamp(x / scale, -max, max))      max: the format's largest finite value
    read    x = float(q) * scale                         in the compute dtype

On CPU the read is the decode gather's conversion: the blocks are gathered as bytes (half of bf16's),
then turned into the head-major compute-dtype copy the matmuls read by bit arithmetic (`_widen`):
torch's own float8 cast is scalar code on CPU, about 10x slower.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from pdserve.config import KV_CACHE_DTYPES

_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# (mantissa bits, exponent bias) of each float8 format and each compute dtype, with the compute
# dtype's integer twin for bit arithmetic.
_FP8_BITS = {torch.float8_e4m3fn: (3, 7), torch.float8_e5m2: (2, 15)}
_WIDE_BITS = {
    torch.bfloat16: (7, 127, torch.int16),
    torch.float16: (10, 15, torch.int16),
    torch.float32: (23, 127, torch.int32),
}


class KVScales(NamedTuple):
    """One layer's scales: stored = value / scale, read = stored * scale."""

    k: float = 1.0
    v: float = 1.0


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's storage dtype: `auto` is the model's; fp8 is fp8_e4m3 (vLLM's names)."""
    if name == "auto":
        return model_dtype
    if name not in _FP8:
        raise ValueError(f"unknown --kv-cache-dtype {name!r}; valid: {', '.join(KV_CACHE_DTYPES)}")
    return _FP8[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _FP8_BITS


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16', 'float8_e4m3fn', ... (what the handshake and /kv_info report)."""
    return str(dtype).removeprefix("torch.")


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x / scale clamped to `dtype`'s finite range, cast to `dtype` (float8)."""
    top = float(torch.finfo(dtype).max)  # 448 or 57344: exact in bf16, fp16 and fp32
    if scale != 1.0:
        return (x.float() / scale).clamp_(-top, top).to(dtype)
    return x.clamp(-top, top).to(dtype)


def _widen(u: torch.Tensor, fp8: torch.dtype, dtype: torch.dtype, scales: tuple[float, ...]) -> torch.Tensor:
    """The float8 bytes `u` ([len(scales), ...], uint8) as `dtype`, row i times scales[i]: sign and
    exponent-mantissa bits moved into place, then one multiply by 2**(bias difference) * scale.
    Exact for every finite float8 value, subnormals included (they land on the wide type's
    subnormals, which the multiply makes normal)."""
    m_in, bias_in = _FP8_BITS[fp8]
    m_out, bias_out, int_t = _WIDE_BITS[dtype]
    shift = m_out - m_in
    mask = (0x7F << shift) - (1 << (int_t.itemsize * 8 - 1))  # the sign bit and the 7 shifted bits, signed
    bits = u.view(torch.int8).to(int_t)  # sign-extended: the sign lands in the top bit
    bits.bitwise_left_shift_(shift).bitwise_and_(mask)
    out = bits.view(dtype)
    unit = 2.0 ** (bias_out - bias_in)
    if len(set(scales)) == 1 and unit * scales[0] < 2.0**127:  # one multiply for K and V
        return out.mul_(unit * scales[0])
    for i, s in enumerate(scales):
        if unit * s < 2.0**127:  # the multiplier is a float32 scalar
            out[i].mul_(unit * s)
        else:
            out[i].mul_(unit).mul_(s)
    return out


def gather_dequantized(
    kv_layer: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype, scales: KVScales
) -> torch.Tensor:
    """K and V of the given blocks of a float8 layer ([nb, 2, kvh, bs, hd]) in `dtype`, head-major:
    [2, kvh, *block_ids.shape[:-1], n*bs, hd] (see attention._gather). One gather of the bytes, then
    the conversion writes the copy the matmuls read; nothing reads the cache twice."""
    nb, _, kvh, bs, hd = kv_layer.shape
    rows = kv_layer.view(torch.uint8).permute(1, 2, 0, 3, 4).index_select(2, block_ids.reshape(-1))
    if kv_layer.is_cuda:
        out = rows.view(kv_layer.dtype).to(dtype)
        for i, s in enumerate(scales):
            if s != 1.0:
                out[i].mul_(s)
    else:
        out = _widen(rows, kv_layer.dtype, dtype, tuple(scales))
    return out.view(2, kvh, *block_ids.shape[:-1], block_ids.shape[-1] * bs, hd)


# Checkpoint names of a layer's KV-cache scales, as vLLM reads them: `self_attn.{k,v}_scale`
# (llm-compressor, vLLM), `self_attn.kv_scale` (both, older checkpoints), `self_attn.{k,v}_proj.
# {k,v}_scale` (ModelOpt), `self_attn.{k,v}_proj.output_scale` (older llm-compressor).
_SCALE_KEY = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\.(?:(k_scale|v_scale|kv_scale)|k_proj\.(k_scale|output_scale)"
    r"|v_proj\.(v_scale|output_scale))$"
)


def kv_scale_key(key: str) -> tuple[int, str] | None:
    """(layer, "k" | "v" | "kv") when `key` names a layer's KV-cache scale, else None."""
    m = _SCALE_KEY.match(key)
    if m is None:
        return None
    plain, k_proj, v_proj = m.group(2), m.group(3), m.group(4)
    which = "k" if k_proj else "v" if v_proj else plain.removesuffix("_scale")
    return int(m.group(1)), which


def scale_value(key: str, t: torch.Tensor) -> float:
    """A per-tensor KV scale's value; ValueError for per-head ones or a non-positive scale."""
    if t.numel() != 1:
        raise ValueError(f"{key} has {t.numel()} values: only per-tensor KV-cache scales are supported")
    value = float(t.reshape(-1)[0].float())
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{key} is {value}: a KV-cache scale must be a positive finite number")
    return value
