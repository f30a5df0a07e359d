"""Write a model as a Hugging Face directory that transformers (and vLLM) load.

Layout: config.json, generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors
+ model.safetensors.index.json past `max_shard_size`), tokenizer.json, tokenizer_config.json.

Optionally FP8-quantized, in the forms real checkpoints take (fp8.py, quantization.py): "fp8", block-wise
128 x 128 `weight_scale_inv` as Qwen3-*-FP8; "fp8-dynamic", compressed-tensors per-channel
`weight_scale` with dynamic activations as the *-FP8-dynamic checkpoints. Every linear layer is
quantized but lm_head and the MoE routers (`mlp.gate`), which stay in the export dtype, as there.

Or 4-bit integer, round-to-nearest (gptq_awq.py, no calibration): "gptq", symmetric GPTQ in the v1
format (`qweight`, `qzeros`, `scales`, `g_idx`; act-order g_idx with `act_order`); "awq", AutoAWQ's
GEMM format (asymmetric, zero points, `modules_to_not_convert` naming lm_head). Group size 128 by
default (`group_size`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pdserve.config import ModelConfig, RopeScaling
from pdserve.model.fp8 import quantize_fp8
from pdserve.model.gptq_awq import awq_config_dict, gptq_config_dict, pack_awq, pack_gptq, quantize_rtn
from pdserve.model.hf_config import (
    ALWAYS_WINDOWED_ARCHITECTURES,
    LAYER_TYPED_ARCHITECTURES,
    MODEL_TYPES,
    OPT_IN_WINDOW_ARCHITECTURES,
    SANDWICH_NORM_ARCHITECTURES,
)
from pdserve.model.loader import load_model
from pdserve.model.quantization import compressed_tensors_config_dict, fp8_block_config_dict
from pdserve.model.tokenizer import Tokenizer

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD_SIZE = 4 * 1000**3  # bytes ("4GB", as transformers counts)
QUANTIZATIONS = ("fp8", "fp8-dynamic", "gptq", "awq")
FP8_BLOCK_SIZE = (128, 128)
INT4_GROUP_SIZE = 128
_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}


def _rope_scaling_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    return {k: v for k, v in asdict(scaling).items() if v is not None}


def _gemma3_rope_fields(config: ModelConfig) -> dict[str, Any]:
    """The local RoPE as the released checkpoints write it (`rope_local_base_freq`; the global one is
    the common rope_theta + rope_scaling) and, when it is scaled, which only transformers 5's form can
    say, both RoPEs as `rope_parameters` per layer type too."""
    d: dict[str, Any] = {"rope_local_base_freq": config.local_rope_theta}
    if config.local_rope_scaling is not None:
        ropes = {
            "full_attention": (config.rope_theta, config.rope_scaling),
            "sliding_attention": (config.local_rope_theta, config.local_rope_scaling),
        }
        d["rope_parameters"] = {
            layer_type: {"rope_type": "default", **(_rope_scaling_dict(scaling) or {}), "rope_theta": theta}
            for layer_type, (theta, scaling) in ropes.items()
        }
    return d


def _family_fields(config: ModelConfig) -> dict[str, Any]:
    """What the Phi-3 and Gemma configs say beyond the common fields."""
    d: dict[str, Any] = {}
    if config.architecture == "Phi3ForCausalLM":
        d["partial_rotary_factor"] = config.partial_rotary_factor
        d["pad_token_id"] = None  # Phi3Config's default, 32000, lies outside smaller vocabularies
        if config.rope_scaling is not None and config.rope_scaling.original_max_position_embeddings:
            d["original_max_position_embeddings"] = config.rope_scaling.original_max_position_embeddings
    if config.architecture in SANDWICH_NORM_ARCHITECTURES:
        d.update(
            hidden_activation=config.hidden_act,
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            attn_logit_softcapping=config.attn_logit_softcapping,
            final_logit_softcapping=config.final_logit_softcapping,
        )
    if config.architecture == "Gemma3ForCausalLM":
        d.update(_gemma3_rope_fields(config))
    return d


def _gemma3_window_fields(config: ModelConfig) -> dict[str, Any]:
    """Gemma 3's `layer_types`, always written (its default pattern would apply otherwise): the
    local-RoPE layers are its sliding ones, and so the windowed ones when a window is shorter than
    the context; `sliding_window` is the context otherwise."""
    local = [config.local_rope(i) for i in range(config.num_hidden_layers)]
    windows = config.sliding_windows
    sizes = {w for w in windows if w is not None}
    if len(sizes) > 1:
        raise ValueError(f"sliding windows {sorted(sizes)}: a config.json holds one window size")
    if windows and [w is not None for w in windows] != local:
        raise ValueError(
            f"Gemma 3 windows exactly its local-RoPE layers: sliding windows {windows}, local RoPE layers {local}"
        )
    return {
        "sliding_window": sizes.pop() if sizes else config.max_position_embeddings,
        "layer_types": ["sliding_attention" if is_local else "full_attention" for is_local in local],
    }


def _window_fields(config: ModelConfig) -> dict[str, Any]:
    """The sliding windows as the architecture's config reads them (hf_config.py's rules, inverted)."""
    arch, windows = config.architecture, config.sliding_windows
    if arch == "Gemma3ForCausalLM":
        return _gemma3_window_fields(config)
    sizes = {w for w in windows if w is not None}
    if not sizes:
        # Gemma 2 always builds a windowed mask: one as long as the context hides nothing.
        return {"sliding_window": config.max_position_embeddings} if arch == "Gemma2ForCausalLM" else {}
    if len(sizes) > 1:
        raise ValueError(f"sliding windows {sorted(sizes)}: a config.json holds one window size")
    if arch not in ALWAYS_WINDOWED_ARCHITECTURES and arch not in OPT_IN_WINDOW_ARCHITECTURES:
        raise ValueError(f"{arch} has no sliding window in transformers")
    d: dict[str, Any] = {"sliding_window": sizes.pop()}
    if arch in OPT_IN_WINDOW_ARCHITECTURES:
        d.update(use_sliding_window=True, max_window_layers=next(i for i, w in enumerate(windows) if w))
    if arch in LAYER_TYPED_ARCHITECTURES:
        d["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in windows]
    elif None in windows:
        raise ValueError(f"{arch} windows every layer or none: sliding windows {windows}")
    return d


def hf_config_dict(
    config: ModelConfig, dtype: torch.dtype, quantization_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """config.json content that transformers' config class of the architecture (and vLLM) accept."""
    eos = list(config.eos_token_ids)
    d: dict[str, Any] = {
        "architectures": [config.architecture],
        "model_type": MODEL_TYPES[config.architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": config.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling_dict(config.rope_scaling),
        "attention_bias": config.qkv_bias,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_hidden_layers,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }
    d.update(_family_fields(config))
    d.update(_window_fields(config))
    if config.is_moe:
        d.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=config.decoder_sparse_step,
            mlp_only_layers=list(config.mlp_only_layers),
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    return d


def generation_config_dict(config: ModelConfig) -> dict[str, Any]:
    """generation_config.json content: bos/eos ids (greedy by default)."""
    eos = list(config.eos_token_ids)
    d: dict[str, Any] = {"do_sample": False}
    if config.bos_token_id is not None:
        d["bos_token_id"] = config.bos_token_id
    if eos:
        d["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return d


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "4GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * _UNITS[unit])
    return int(s)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_weights(
    state_dict: Mapping[str, torch.Tensor], out_dir: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[str]:
    """Write safetensors files (sharded with an index past max_shard_size); returns the file names."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state_dict.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        size += n
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards, strict=True):
        path = out_dir / fname
        # safetensors writes through a private temp file (0600): give the shard the mode a plain file
        # gets here, so a server running as another user (vLLM in a container) can read it.
        path.touch()
        mode = path.stat().st_mode & 0o777
        save_file(shard, str(path), metadata={"format": "pt"})
        path.chmod(mode)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        weight_map = {k: fname for fname, shard in zip(names, shards, strict=True) for k in shard}
        _write_json(
            out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    return names


def save_hf_dir(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    quantization_config: dict[str, Any] | None = None,
) -> Path:
    """Write config, generation config, weights (`state_dict` with HF names) and tokenizer to out_dir.

    With tie_word_embeddings, lm_head.weight is left out (as transformers does). The tokenizer
    defaults to the byte-level one sized to the vocabulary. A quantized state dict (FP8 weights and
    their scales) comes with its `quantization_config`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in state_dict.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    dtype = next(v.dtype for v in tensors.values() if v.dtype.is_floating_point and v.element_size() > 1)
    _write_json(out / "config.json", hf_config_dict(config, dtype, quantization_config))
    _write_json(out / "generation_config.json", generation_config_dict(config))
    save_weights(tensors, out, max_shard_size)
    if tokenizer is None:
        tokenizer = Tokenizer.byte_level(config.vocab_size, config.max_position_embeddings)
    tokenizer.save(out)
    return out


def _unquantized_linears(module: nn.Module) -> list[str]:
    """The linear layers FP8 checkpoints keep in bf16: lm_head and the MoE routers."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and (name == "lm_head" or name.endswith(".mlp.gate"))
    ]


def quantize_fp8_state_dict(
    module: nn.Module, quantization: str, block: tuple[int, int] = FP8_BLOCK_SIZE
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(`module`'s state dict with its linear weights FP8-quantized, next to their scales; the
    `quantization_config` that describes them). `quantization`: one of QUANTIZATIONS (module doc)."""
    if quantization not in QUANTIZATIONS[:2]:
        raise ValueError(f"unknown FP8 quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS[:2])}")
    keep = _unquantized_linears(module)
    quantized = {
        f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Linear) and name not in keep
    }
    out: dict[str, torch.Tensor] = {}
    for key, t in module.state_dict().items():
        if key not in quantized:
            out[key] = t
        elif quantization == "fp8":
            out[key], out[key.removesuffix("weight") + "weight_scale_inv"] = quantize_fp8(t, block)
        else:  # per output channel, scales in the weights' dtype
            out[key], out[key.removesuffix("weight") + "weight_scale"] = quantize_fp8(t, (1, t.shape[1]), t.dtype)
    if quantization == "fp8":
        return out, fp8_block_config_dict(block, keep)
    return out, compressed_tensors_config_dict("channel", keep)


def act_order_permutation(weight: torch.Tensor) -> torch.Tensor:
    """The input features by decreasing column norm: the order GPTQ's desc_act quantizes in (by the
    Hessian's diagonal, which RTN has not; the column norm stands in for it)."""
    return torch.argsort(weight.float().norm(dim=0), descending=True, stable=True)


def _input_of(linear: str) -> str:
    parent, _, name = linear.rpartition(".")
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    return f"{parent}.{shared.get(name, name)}"


def quantize_int4_state_dict(
    module: nn.Module, quantization: str, group_size: int = INT4_GROUP_SIZE, act_order: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(`module`'s state dict with its linear weights 4-bit quantized by round-to-nearest and packed
    as `quantization` ("gptq" or "awq") packs them; its `quantization_config`). lm_head and the MoE
    routers stay as they are; `act_order` (GPTQ only) forms the groups over act_order_permutation."""
    if quantization not in ("gptq", "awq"):
        raise ValueError(f"unknown 4-bit quantization {quantization!r}; valid: gptq, awq")
    if act_order and quantization != "gptq":
        raise ValueError("act-order (desc_act) is a GPTQ option")
    keep = _unquantized_linears(module)
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear) and name not in keep}
    perms: dict[str, torch.Tensor] = {}
    if act_order:  # layers that read the same input (q/k/v, gate/up) share its order, as in GPTQ
        inputs: dict[str, list[torch.Tensor]] = {}
        for name, m in linears.items():
            inputs.setdefault(_input_of(name), []).append(m.weight)
        order = {key: act_order_permutation(torch.cat(ws)) for key, ws in inputs.items()}
        perms = {name: order[_input_of(name)] for name in linears}
    out: dict[str, torch.Tensor] = {}
    for key, t in module.state_dict().items():
        prefix = key.removesuffix(".weight")
        if not (key.endswith(".weight") and prefix in linears):
            out[key] = t
            continue
        perm = perms.get(prefix)
        w = quantize_rtn(t, 4, group_size, sym=quantization == "gptq", act_order=perm)
        packed = pack_gptq(w) if quantization == "gptq" else pack_awq(w)
        out.update({f"{prefix}.{name}": v for name, v in packed.items()})
    if quantization == "gptq":
        return out, gptq_config_dict(4, group_size, act_order)
    return out, awq_config_dict(group_size, keep)


def export_model(
    model: str,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | str = "bfloat16",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    seed: int = 0,
    quantization: str | None = None,
    weight_block_size: tuple[int, int] = FP8_BLOCK_SIZE,
    group_size: int = INT4_GROUP_SIZE,
    act_order: bool = False,
) -> Path:
    """Load `model` (HF dir or dummy:<preset>) on CPU and write it as an HF directory at out_dir,
    quantized with `quantization` (QUANTIZATIONS; `weight_block_size` for "fp8", `group_size` and
    `act_order` for "gptq" / "awq"), the other tensors in `dtype`."""
    loaded = load_model(model, dtype, "cpu", seed=seed, int4_kernels=False)  # plain linears to export
    if quantization is None:
        return save_hf_dir(out_dir, loaded.config, loaded.module.state_dict(), loaded.tokenizer, max_shard_size)
    if quantization in ("gptq", "awq"):
        tensors, qconfig = quantize_int4_state_dict(loaded.module, quantization, group_size, act_order)
    else:
        tensors, qconfig = quantize_fp8_state_dict(loaded.module, quantization, weight_block_size)
    return save_hf_dir(out_dir, loaded.config, tensors, loaded.tokenizer, max_shard_size, qconfig)
