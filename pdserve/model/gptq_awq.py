"""GPTQ and AWQ integer checkpoints: their config, their packed tensors, and the arithmetic.

Both store, per quantized linear `X` (W [out, in] in the model), integers Q in [0, 2^bits), a zero
point Z and a float scale S per (group of input features, output feature):

    W[n, k] = (Q[n, k] - Z[g(k), n]) * S[g(k), n]       g(k) = g_idx[k], by default k // group_size

What differs is how the integers are packed into int32 words (low bits first in a word).

GPTQ (AutoGPTQ / GPTQModel / optimum; vLLM's gptq.py reads the same), `bits` 4 or 8, pf = 32 / bits:

    X.qweight int32 [in / pf, out]   packed along the INPUT dim:
                                     qweight[i, n] = sum_j Q[n, i*pf + j] << (bits * j)
    X.qzeros  int32 [groups, out / pf] packed along the output dim:
                                     qzeros[g, i] = sum_j Zs[g, i*pf + j] << (bits * j)
    X.scales  fp16  [groups, out]
    X.g_idx   int32 [in]             each input feature's group; with desc_act (act-order) it is not
                                     k // group_size: groups were formed over a permutation of the
                                     input features, the storage stays in the original order

    The zero points are stored as Zs = Z - 1 in the v1 format (`checkpoint_format` "gptq", the
    default, AutoGPTQ's historical offset; read back as (Zs & mask) + 1) and as Zs = Z in GPTQModel's
    "gptq_v2". Symmetric GPTQ has Z = 2^(bits-1) everywhere (4-bit v1: qzeros words 0x77777777).

AWQ (AutoAWQ's GEMM `version`, as vLLM's awq.py and transformers read it), 4 bits only:

    X.qweight int32 [in, out / 8]    packed along the OUTPUT dim, in AWQ's interleaved order:
    X.qzeros  int32 [groups, out / 8]  same packing, Z stored as is (no offset)
    X.scales  fp16  [groups, out]

        one int32 word of row k, covering output columns 8c .. 8c+7:

        bits   31..28 27..24 23..20 19..16 15..12 11..8  7..4   3..0
        col    8c+7   8c+5   8c+3   8c+1   8c+6   8c+4   8c+2   8c+0     (nibble i holds column
                                                                          8c + [0,2,4,6,1,3,5,7][i])

    AWQ groups are always contiguous (k // group_size); "gemv" and other versions are refused.

Quantizing (for exported test checkpoints) is round-to-nearest, no calibration: GPTQ's symmetric
quantizer (scale = 2 amax / (2^bits - 1), Z = 2^(bits-1)) and AutoAWQ's asymmetric one (scale =
(max - min) / (2^bits - 1), Z = round(-min / scale)), with the scale rounded to fp16 first, so that
dequantizing the stored tensors gives exactly the weights the quantizer meant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

QuantMethod = Literal["gptq", "awq"]
GPTQ_BITS = (4, 8)
AWQ_BITS = (4,)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]
# The tensors next to a quantized linear's `qweight`; read with it.
PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
_STRIPE_ELEMENTS = 1 << 22  # output rows dequantized at a time: ~16 MiB of float32 per temporary


def _refuse(method: Any, why: str) -> ValueError:
    return ValueError(
        f"unsupported quantization_config.quant_method {method!r}: {why}; pdserve loads GPTQ (4 or 8 bits, "
        "checkpoint_format gptq or gptq_v2) and AWQ (4 bits, version gemm) checkpoints"
    )


@dataclass(frozen=True)
class PackedIntConfig:
    """A GPTQ or AWQ checkpoint's quantization_config, as far as loading it needs.

    group_size: input features per scale (-1 in the config: one group over all of them, per channel).
    zero_offset: what is added to a stored zero point (1 for GPTQ's v1 format, else 0).
    ignored_modules: modules the config says stay unquantized (AWQ's `modules_to_not_convert`);
    informational, as for FP8: a linear with a `qweight` is quantized, one with a `weight` is not."""

    quant_method: QuantMethod
    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    zero_offset: int = 0
    ignored_modules: tuple[str, ...] = ()

    @staticmethod
    def is_auxiliary(key: str) -> bool:
        """True for the tensors read together with a `qweight` (zeros, scales, g_idx)."""
        return key.endswith(PACKED_SUFFIXES[1:])


def _int(cfg: Mapping[str, Any], key: str, default: int, method: str) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(method, f"{key} {value!r} is not an integer")
    return value


def _group_size(cfg: Mapping[str, Any], method: str) -> int:
    group = _int(cfg, "group_size", 128, method)
    if group != -1 and group < 1:
        raise _refuse(method, f"group_size {group} (a positive size, or -1 for per-channel)")
    return group


def parse_gptq(cfg: Mapping[str, Any]) -> PackedIntConfig:
    """`quant_method: gptq` (AutoGPTQ, GPTQModel, optimum / transformers' GPTQConfig)."""
    bits = _int(cfg, "bits", 4, "gptq")
    if bits not in GPTQ_BITS:
        raise _refuse("gptq", f"bits {bits} (supported: {', '.join(map(str, GPTQ_BITS))})")
    fmt = cfg.get("checkpoint_format") or (cfg.get("meta") or {}).get("checkpoint_format") or "gptq"
    if fmt not in GPTQ_FORMATS:
        raise _refuse("gptq", f"checkpoint_format {fmt!r} (supported: {', '.join(GPTQ_FORMATS)})")
    if cfg.get("dynamic"):
        raise _refuse("gptq", "per-module `dynamic` overrides")
    return PackedIntConfig(
        quant_method="gptq",
        bits=bits,
        group_size=_group_size(cfg, "gptq"),
        sym=bool(cfg.get("sym", True)),
        desc_act=bool(cfg.get("desc_act", False)),
        zero_offset=1 if fmt == "gptq" else 0,
    )


def parse_awq(cfg: Mapping[str, Any]) -> PackedIntConfig:
    """`quant_method: awq` in AutoAWQ's GEMM format (transformers' AwqConfig names bits `bits` or
    `w_bit`, the group `group_size` or `q_group_size`)."""
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse("awq", f"version {cfg.get('version')!r} (only AutoAWQ's GEMM layout is supported)")
    bits = _int(cfg, "bits", _int(cfg, "w_bit", 4, "awq"), "awq")
    if bits not in AWQ_BITS:
        raise _refuse("awq", f"bits {bits} (supported: 4)")
    group = _group_size({"group_size": cfg.get("group_size", cfg.get("q_group_size", 128))}, "awq")
    if cfg.get("zero_point", True) is not True:
        raise _refuse("awq", "zero_point false (AutoAWQ's GEMM checkpoints store zero points)")
    return PackedIntConfig(
        quant_method="awq",
        bits=bits,
        group_size=group,
        sym=False,
        ignored_modules=tuple(str(m) for m in cfg.get("modules_to_not_convert") or ()),
    )


def gptq_config_dict(bits: int, group_size: int, desc_act: bool) -> dict[str, Any]:
    """`quantization_config` of a symmetric GPTQ checkpoint in the v1 format, as AutoGPTQ / optimum
    write it."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": True,
        "true_sequential": True,
        "damp_percent": 0.01,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "model_name_or_path": None,
        "model_file_base_name": None,
    }


def awq_config_dict(group_size: int, unquantized: list[str]) -> dict[str, Any]:
    """`quantization_config` of an AutoAWQ GEMM checkpoint (as Qwen3-8B-AWQ's config.json has it)."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": unquantized,
    }


# ---- the integers, unpacked ---------------------------------------------------------------------


@dataclass(frozen=True)
class IntWeight:
    """A quantized linear weight, unpacked: W[n, k] = (q[n, k] - zeros[g_idx[k], n]) * scales[g_idx[k], n].

    q uint8 [out, in]; zeros int32 [groups, out] (the true zero points, offsets applied); scales float
    [groups, out]; g_idx int64 [in]; group_size: input features per group (the config's; in for -1)."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.q.shape[0]), int(self.q.shape[1])

    def contiguous_groups(self) -> int | None:
        """The group size when every group is a contiguous run of input features (g_idx = k // size,
        the last group possibly shorter), else None (act-order)."""
        expected = torch.arange(self.q.shape[1], device=self.g_idx.device) // self.group_size
        return self.group_size if torch.equal(self.g_idx, expected) else None


def _unpack_words(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 words [..., W] -> uint8 values [..., W * 32 / bits], value j of a word at bits*j (low bits
    first); with `order` (AWQ), value j of a word goes to position order[j] of its run."""
    pf = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    values = (words.unsqueeze(-1) >> shifts).bitwise_and_((1 << bits) - 1).to(torch.uint8)  # [..., W, pf]
    if order is not None:
        values = values[..., torch.argsort(torch.tensor(order, device=words.device))]
    return values.reshape(*words.shape[:-1], words.shape[-1] * pf)


def _pack_words(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of _unpack_words: uint values [..., V] (V a multiple of 32 / bits) -> int32 words."""
    pf = 32 // bits
    if values.shape[-1] % pf:
        raise ValueError(f"{values.shape[-1]} values do not fill whole {bits}-bit words of 32 bits")
    v = values.to(torch.int64).reshape(*values.shape[:-1], values.shape[-1] // pf, pf)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (v << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    zero_offset: int,
) -> IntWeight:
    """A GPTQ linear's tensors (module doc) -> IntWeight; ValueError naming the tensor that does not fit."""
    pf = 32 // bits
    in_features, out = qweight.shape[0] * pf, qweight.shape[1]
    size = in_features if group_size == -1 else group_size
    groups = -(-in_features // size)
    _check("scales", scales, (groups, out))
    _check("qzeros", qzeros, (groups, -(-out // pf)))
    q = _unpack_words(qweight.to(torch.int32).t(), bits)  # [out, in]
    zeros = _unpack_words(qzeros.to(torch.int32), bits)[:, :out].to(torch.int32) + zero_offset
    if g_idx is None:
        g_idx = torch.arange(in_features) // size
    _check("g_idx", g_idx, (in_features,))
    g_idx = g_idx.to(torch.int64)
    if groups and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx names groups outside the {groups} of scales")
    return IntWeight(q.contiguous(), zeros, scales, g_idx, bits, size)


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int = 4
) -> IntWeight:
    """An AWQ GEMM linear's tensors (module doc) -> IntWeight."""
    pf = 32 // bits
    in_features, out = qweight.shape[0], qweight.shape[1] * pf
    size = in_features if group_size == -1 else group_size
    groups = -(-in_features // size)
    _check("scales", scales, (groups, out))
    _check("qzeros", qzeros, (groups, out // pf))
    q = _unpack_words(qweight.to(torch.int32), bits, AWQ_ORDER).t().contiguous()  # [out, in]
    zeros = _unpack_words(qzeros.to(torch.int32), bits, AWQ_ORDER).to(torch.int32)
    return IntWeight(q, zeros, scales, torch.arange(in_features) // size, bits, size)


def pack_gptq(w: IntWeight, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """IntWeight -> {qweight, qzeros, scales (fp16), g_idx (int32)} in GPTQ's layout (v1 with
    zero_offset 1, v2 with 0)."""
    return {
        "qweight": _pack_words(w.q, w.bits).t().contiguous(),
        "qzeros": _pack_words((w.zeros - zero_offset).bitwise_and((1 << w.bits) - 1), w.bits),
        "scales": w.scales.to(torch.float16),
        "g_idx": w.g_idx.to(torch.int32),
    }


def pack_awq(w: IntWeight) -> dict[str, torch.Tensor]:
    """IntWeight (4 bits, contiguous groups) -> {qweight, qzeros, scales (fp16)} in AutoAWQ's GEMM layout."""
    if w.bits != 4 or w.contiguous_groups() is None:
        raise ValueError("AWQ packs 4-bit weights with contiguous groups")
    return {
        "qweight": _pack_words(w.q.t(), 4, AWQ_ORDER).contiguous(),
        "qzeros": _pack_words(w.zeros, 4, AWQ_ORDER),
        "scales": w.scales.to(torch.float16),
    }


# ---- quantizing and dequantizing ----------------------------------------------------------------


@torch.no_grad()
def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: torch.Tensor | None = None
) -> IntWeight:
    """Round-to-nearest quantization of weight [out, in] (module doc), groups of `group_size` input
    features (-1: one group); `act_order`: a permutation of the input features over which the
    groups are formed (GPTQ's desc_act; g_idx then maps each feature to its group)."""
    out, k = weight.shape
    size = k if group_size == -1 else group_size
    perm = torch.arange(k) if act_order is None else act_order.to(torch.int64)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[perm] = torch.arange(k) // size
    groups = -(-k // size)
    maxq = (1 << bits) - 1
    w = weight.to(torch.float32)
    scales = torch.empty(groups, out)
    zeros = torch.empty(groups, out, dtype=torch.int32)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            amax = cols.abs().amax(dim=1)
            scale = torch.where(amax > 0, 2 * amax / maxq, torch.ones_like(amax))
            zero = torch.full((out,), (maxq + 1) // 2, dtype=torch.int32)
        else:
            hi, lo = cols.amax(dim=1), cols.amin(dim=1)
            scale = (hi - lo).clamp(min=1e-5) / maxq
            zero = (-lo / scale.to(torch.float16).float()).round().clamp(0, maxq).to(torch.int32)
        scales[g] = scale.to(torch.float16).float()  # the stored scale is what the values are rounded by
        zeros[g] = zero
    s, z = scales.index_select(0, g_idx).t(), zeros.index_select(0, g_idx).t()  # [out, in]
    q = (w / s).round().add(z).clamp(0, maxq).to(torch.uint8)
    return IntWeight(q, zeros, scales, g_idx, bits, size)


@torch.no_grad()
def dequantize_into_(dst: torch.Tensor, w: IntWeight) -> None:
    """dst [out, in] <- (q - zero) * scale, computed in float32 on dst's device and rounded once to
    dst's dtype; a stripe of output rows at a time, so the float32 temporaries stay small."""
    if tuple(dst.shape) != w.shape:
        raise ValueError(f"quantized weight of shape {list(w.shape)} does not fit parameter {list(dst.shape)}")
    out, k = w.shape
    device = dst.device
    g_idx = w.g_idx.to(device)
    step = max(1, _STRIPE_ELEMENTS // max(k, 1))
    for n0 in range(0, out, step):
        n1 = min(out, n0 + step)
        s = w.scales[:, n0:n1].to(device=device, dtype=torch.float32).index_select(0, g_idx).t()
        z = w.zeros[:, n0:n1].to(device=device, dtype=torch.float32).index_select(0, g_idx).t()
        dst[n0:n1].copy_(w.q[n0:n1].to(device=device, dtype=torch.float32).sub_(z).mul_(s))


def dequantize(w: IntWeight, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """W [out, in] as a new `dtype` tensor (see dequantize_into_)."""
    out = torch.empty(w.shape, dtype=dtype, device=device)
    dequantize_into_(out, w)
    return out


def concat_outputs(parts: list[IntWeight]) -> IntWeight | None:
    """The IntWeight of the layer whose outputs are the parts' outputs, in order (fused q/k/v,
    gate/up), or None when the parts do not share bits, input features and groups (g_idx)."""
    first = parts[0]
    if any(p.bits != first.bits or p.group_size != first.group_size or not torch.equal(p.g_idx, first.g_idx)
           for p in parts[1:]):
        return None
    return IntWeight(
        torch.cat([p.q for p in parts]),
        torch.cat([p.zeros for p in parts], dim=1),
        torch.cat([p.scales for p in parts], dim=1),
        first.g_idx,
        first.bits,
        first.group_size,
    )


def read_int_weight(
    get: Callable[[str], torch.Tensor], has: Callable[[str], bool], prefix: str, config: PackedIntConfig
) -> IntWeight:
    """The IntWeight of linear `prefix` from a checkpoint (`get` a tensor by name, `has` it); ValueError
    naming what is missing or does not fit."""
    names = {suffix: f"{prefix}{suffix}" for suffix in PACKED_SUFFIXES}
    for suffix in (".qzeros", ".scales"):
        if not has(names[suffix]):
            raise ValueError(f"the checkpoint lacks {names[suffix]}")
    qweight, qzeros, scales = get(names[".qweight"]), get(names[".qzeros"]), get(names[".scales"])
    for name, t in ((names[".qweight"], qweight), (names[".qzeros"], qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{name} is {t.dtype} {list(t.shape)}: packed weights are 2-D int32")
    try:
        if config.quant_method == "awq":
            return unpack_awq(qweight, qzeros, scales, config.group_size, config.bits)
        g_idx = get(names[".g_idx"]) if has(names[".g_idx"]) else None
        return unpack_gptq(qweight, qzeros, scales, g_idx, config.bits, config.group_size, config.zero_offset)
    except ValueError as e:
        raise ValueError(f"{prefix}.{e}") from None
