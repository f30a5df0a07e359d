"""config.json's `quantization_config` -> QuantizationConfig: which FP8 checkpoints pdserve loads.

| quant_method         | scale tensor next to each FP8 `weight`             | as written by                   |
| -------------------- | -------------------------------------------------- | ------------------------------- |
| `fp8` + block size   | `weight_scale_inv` [ceil(out/bn), ceil(in/bk)]     | Qwen3-*-FP8, DeepSeek-V3/R1     |
| `fp8`, no block size | `weight_scale` (vLLM) or `weight_scale_inv`        | vLLM / transformers per-tensor  |
|                      | (transformers) [1] or []                           |                                 |
| `compressed-tensors` | `weight_scale` [1] (tensor), [out, 1] (channel),   | llm-compressor: RedHat /        |
|                      | [ceil(out/bn), ceil(in/bk)] (block)                | neuralmagic *-FP8(-dynamic)     |
| `fbgemm_fp8`         | `weight_scale` [out, 1]                            | transformers' FbgemmFp8Config   |

Weights are dequantized at load (fp8.py); the stored dtype decides, per tensor, whether a weight is
quantized (layers left out — `modules_to_not_convert`, `ignored_layers`, `ignore`: lm_head, MoE
routers — are stored in bf16). Activation scales (`input_scale`, `activation_scale`) are read past:
activations stay in the serving dtype. FP8 KV-cache scales (`k_scale`, `v_scale`, `kv_scale`) are
read by the loader for `--kv-cache-dtype fp8` (kv_quant.py). `gptq` and `awq` (integer weights
packed in int32 words) are parsed by gptq_awq.py. Every other method (bitsandbytes, integer or 4-bit
compressed-tensors, ...) is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pdserve.model.gptq_awq import PackedIntConfig, parse_awq, parse_gptq

SUPPORTED_METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8")
INTEGER_METHODS = ("gptq", "awq")  # gptq_awq.py
ActivationScheme = Literal["dynamic", "static"]
# Tensors beside quantized weights that a dequantizing loader reads past.
AUXILIARY_SUFFIXES = (
    ".weight_scale_inv",
    ".weight_scale",
    ".input_scale",
    ".input_scale_ub",
    ".activation_scale",
    ".k_scale",
    ".v_scale",
    ".q_scale",
    ".prob_scale",
    ".output_scale",
)
_CT_FLOAT_FORMATS = ("float-quantized", "naive-quantized")
_CT_STRATEGIES = ("tensor", "channel", "block")


@dataclass(frozen=True)
class QuantizationConfig:
    """An FP8 checkpoint's quantization, as far as loading it needs.

    scale_suffixes: the names a quantized `X.weight`'s scale may have (`X.<suffix>`), first preferred.
    weight_block_size: (rows, cols) of W per scale for block-wise scales (None: per-tensor/channel).
    ignored_modules: the modules the checkpoint says it left unquantized (informational: the stored
    dtype decides)."""

    quant_method: str
    scale_suffixes: tuple[str, ...]
    weight_block_size: tuple[int, int] | None = None
    activation_scheme: ActivationScheme = "dynamic"
    ignored_modules: tuple[str, ...] = ()

    def scale_names(self, weight_key: str) -> tuple[str, ...]:
        """The checkpoint names the scale of `weight_key` (`prefix.weight`) may have."""
        prefix = weight_key.removesuffix(".weight")
        return tuple(f"{prefix}.{suffix}" for suffix in self.scale_suffixes)

    @staticmethod
    def is_auxiliary(key: str) -> bool:
        """True for scale tensors (weight, activation, KV cache), which are not model parameters."""
        return key.endswith(AUXILIARY_SUFFIXES)


def _refuse(method: Any, why: str) -> ValueError:
    return ValueError(
        f"unsupported quantization_config.quant_method {method!r}: {why}; pdserve loads FP8 checkpoints "
        f"({', '.join(SUPPORTED_METHODS)} with float8_e4m3 weights), GPTQ and AWQ ones and unquantized ones"
    )


def _block_size(value: Any, method: str) -> tuple[int, int] | None:
    if value is None:
        return None
    block = tuple(int(v) for v in value)
    if len(block) != 2 or min(block) < 1:
        raise _refuse(method, f"weight block size {list(value)} is not two positive ints")
    return block  # type: ignore[return-value]


def _activation_scheme(value: Any, method: str) -> ActivationScheme:
    scheme = str(value or "dynamic").lower()
    if scheme not in ("dynamic", "static"):
        raise _refuse(method, f"activation_scheme {value!r} is neither dynamic nor static")
    return scheme  # type: ignore[return-value]


def _ignored(cfg: Mapping[str, Any], *keys: str) -> tuple[str, ...]:
    for key in keys:
        if cfg.get(key):
            return tuple(str(m) for m in cfg[key])
    return ()


def _fp8(cfg: Mapping[str, Any]) -> QuantizationConfig:
    """`quant_method: fp8` (vLLM's Fp8Config, transformers' FineGrainedFP8Config)."""
    fmt = cfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse("fp8", f"fmt {fmt!r} (only e4m3 weights are supported)")
    if cfg.get("expert_dtype", "fp8") != "fp8":
        raise _refuse("fp8", f"expert_dtype {cfg['expert_dtype']!r} (only FP8 experts are supported)")
    block = _block_size(cfg.get("weight_block_size"), "fp8")
    return QuantizationConfig(
        quant_method="fp8",
        # vLLM names a per-tensor scale weight_scale, transformers weight_scale_inv; block-wise is _inv.
        scale_suffixes=("weight_scale_inv",) if block else ("weight_scale", "weight_scale_inv"),
        weight_block_size=block,
        activation_scheme=_activation_scheme(cfg.get("activation_scheme"), "fp8"),
        ignored_modules=_ignored(cfg, "ignored_layers", "modules_to_not_convert"),
    )


def _fbgemm_fp8(cfg: Mapping[str, Any]) -> QuantizationConfig:
    """`quant_method: fbgemm_fp8`: per-channel weight scales, dynamic per-token activations."""
    return QuantizationConfig(
        quant_method="fbgemm_fp8",
        scale_suffixes=("weight_scale",),
        ignored_modules=_ignored(cfg, "modules_to_not_convert"),
    )


def _ct_group(name: str, group: Mapping[str, Any]) -> tuple[tuple[int, int] | None, ActivationScheme]:
    """One compressed-tensors config group: (weight block size, activation scheme); refused unless its
    weights are symmetric 8-bit floats (W8A8-FP8 or W8A16-FP8)."""
    method = "compressed-tensors"
    weights = group.get("weights") or {}
    kind, bits = weights.get("type"), weights.get("num_bits")
    if kind != "float" or bits != 8:
        raise _refuse(method, f"config_groups.{name}.weights are {kind} {bits}-bit, not float 8-bit (FP8)")
    strategy = weights.get("strategy")
    if strategy not in _CT_STRATEGIES:
        raise _refuse(method, f"config_groups.{name}.weights.strategy {strategy!r} (supported: {_CT_STRATEGIES})")
    if weights.get("symmetric") is False or weights.get("dynamic") is True:
        raise _refuse(method, f"config_groups.{name}.weights are asymmetric or dynamic")
    block = _block_size(weights.get("block_structure"), method) if strategy == "block" else None
    if strategy == "block" and block is None:
        raise _refuse(method, f"config_groups.{name}.weights.strategy is block without a block_structure")
    acts = group.get("input_activations")
    if acts and (acts.get("type"), acts.get("num_bits")) != ("float", 8):
        raise _refuse(method, f"config_groups.{name}.input_activations are not float 8-bit")
    return block, "static" if acts and not acts.get("dynamic") else "dynamic"


def _compressed_tensors(cfg: Mapping[str, Any]) -> QuantizationConfig:
    """`quant_method: compressed-tensors` with FP8 weights (llm-compressor's FP8, FP8_DYNAMIC and
    FP8_BLOCK schemes)."""
    method = "compressed-tensors"
    fmt = cfg.get("format")
    if fmt is not None and fmt not in _CT_FLOAT_FORMATS:
        raise _refuse(method, f"format {fmt!r} (supported: {', '.join(_CT_FLOAT_FORMATS)})")
    sparsity = cfg.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise _refuse(method, f"sparsity_config.format {sparsity['format']!r} (only dense weights are supported)")
    groups = cfg.get("config_groups") or {}
    if not groups:
        raise _refuse(method, "no config_groups")
    parsed = [_ct_group(name, group) for name, group in groups.items()]
    for name, group in groups.items():
        if group.get("format") not in (None, *_CT_FLOAT_FORMATS):
            raise _refuse(method, f"config_groups.{name}.format {group['format']!r}")
    blocks = {block for block, _ in parsed if block is not None}
    if len(blocks) > 1:
        raise _refuse(method, f"several weight block structures {sorted(blocks)}")
    return QuantizationConfig(
        quant_method=method,
        scale_suffixes=("weight_scale",),
        weight_block_size=blocks.pop() if blocks else None,
        activation_scheme="static" if any(s == "static" for _, s in parsed) else "dynamic",
        ignored_modules=_ignored(cfg, "ignore"),
    )


_PARSERS = {
    "fp8": _fp8,
    "compressed-tensors": _compressed_tensors,
    "fbgemm_fp8": _fbgemm_fp8,
    "gptq": parse_gptq,
    "awq": parse_awq,
}


def parse_quantization_config(cfg: Mapping[str, Any] | None) -> QuantizationConfig | PackedIntConfig | None:
    """The QuantizationConfig of config.json's `quantization_config` (None: not quantized); ValueError
    naming `quantization_config.quant_method` for every method or scheme pdserve does not load."""
    if not cfg:
        return None
    method = cfg.get("quant_method")
    parser = _PARSERS.get(str(method).lower())
    if parser is None:
        raise _refuse(method, "not an FP8, GPTQ or AWQ method")
    return parser(cfg)


def fp8_block_config_dict(block: tuple[int, int], unquantized: list[str]) -> dict[str, Any]:
    """`quantization_config` of a block-wise FP8 checkpoint as Qwen3-*-FP8 write it."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": unquantized,
    }


def compressed_tensors_config_dict(strategy: Literal["tensor", "channel"], unquantized: list[str]) -> dict[str, Any]:
    """`quantization_config` of a compressed-tensors FP8 checkpoint with dynamic per-token activations
    (llm-compressor's FP8_DYNAMIC scheme with "channel"; weights per tensor with "tensor")."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "type": "float",
                    "num_bits": 8,
                    "strategy": strategy,
                    "symmetric": True,
                    "dynamic": False,
                },
                "input_activations": {
                    "type": "float",
                    "num_bits": 8,
                    "strategy": "token",
                    "symmetric": True,
                    "dynamic": True,
                },
                "output_activations": None,
            }
        },
        "ignore": unquantized,
        "kv_cache_scheme": None,
    }
