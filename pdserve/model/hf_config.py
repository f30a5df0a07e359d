"""Hugging Face config.json (+ generation_config.json) -> ModelConfig, for the supported families.

| architecture         | q/k norm | biases              | notes                                              |
| -------------------- | -------- | ------------------- | -------------------------------------------------- |
| Qwen3ForCausalLM     | yes      | `attention_bias`    | sliding window as Qwen2                            |
| Qwen3MoeForCausalLM  | yes      | `attention_bias`    | expert MLP on sparse layers; with                  |
|                      |          |                     | `use_sliding_window`, a window on every layer      |
| Qwen2ForCausalLM     | no       | q/k/v always        | Qwen2 and Qwen2.5; with `use_sliding_window`, a    |
|                      |          |                     | window on `layer_types`' sliding layers (default:  |
|                      |          |                     | those from `max_window_layers` on)                 |
| LlamaForCausalLM     | no       | `attention_bias`    | Llama 2/3.x (llama3 RoPE scaling)                  |
| MistralForCausalLM   | no       | none                | sliding window on every layer                      |
| Phi3ForCausalLM      | no       | none                | fused qkv/gate_up weights, longrope, partial RoPE, |
|                      |          |                     | sliding window as Mistral                          |
| GemmaForCausalLM     | no       | `attention_bias`    | (1 + w) norms, sqrt(hidden) embedding scale, GeGLU |
| Gemma2ForCausalLM    | no       | `attention_bias`    | Gemma + output norms, soft-capping, sliding window |
|                      |          |                     | on `layer_types`' sliding layers (even by default) |

RoPE scalings: linear, llama3, yarn, longrope (rope.py). Activations: silu, and for the Gemma
families the tanh-approximated GELU (their configs' legacy "gelu" means it too, as in transformers).
Sliding windows follow transformers' reading of config.json, defaults included (`sliding_window`
4096 where absent, but none for Phi-3): they become ModelConfig.sliding_windows, one entry per
layer, kept only where the window is shorter than the context (max_position_embeddings).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from pdserve.config import ModelConfig, RopeScaling

MODEL_TYPES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
}
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
GEMMA_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM")
# transformers' window where config.json has no `sliding_window`, for the families that always window
# (those of OPT_IN_WINDOW_ARCHITECTURES window only with `use_sliding_window`).
ALWAYS_WINDOWED_ARCHITECTURES: dict[str, int | None] = {
    "MistralForCausalLM": 4096,
    "Phi3ForCausalLM": None,
    "Gemma2ForCausalLM": 4096,
}
OPT_IN_WINDOW_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# Families whose config reads `layer_types` to pick the windowed layers; the others window every layer.
LAYER_TYPED_ARCHITECTURES = ("Gemma2ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_FULL_LAYER_TYPES = ("full_attention", "attention")  # "attention": transformers' legacy name
_ROPE_FIELDS = {f.name for f in fields(RopeScaling)} - {"rope_type"}


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def architecture_of(cfg: dict[str, Any]) -> str:
    """The supported architecture named by `architectures` (or `model_type`); ValueError otherwise."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in MODEL_TYPES:
            return arch
    by_type = {t: a for a, t in MODEL_TYPES.items()}
    if not archs and cfg.get("model_type") in by_type:
        return by_type[cfg["model_type"]]
    found = archs or cfg.get("model_type")
    raise ValueError(
        f"unsupported architecture {found!r}; supported: {', '.join(MODEL_TYPES)} "
        f"(model_type {', '.join(MODEL_TYPES.values())})"
    )


def _rope(cfg: dict[str, Any], arch: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or 10_000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if arch == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # early Phi-3 configs' names for it (transformers maps them too)
    if rope_type in (None, "default"):
        return theta, None
    if rope_type not in ("linear", "llama3", "yarn", "longrope"):
        raise ValueError(
            f"unsupported rope scaling {rope_type!r}: supported are default, linear, llama3, yarn and longrope"
        )
    values = {k: v for k, v in scaling.items() if k in _ROPE_FIELDS and v is not None}
    context = cfg.get("max_position_embeddings")
    if rope_type == "longrope":
        # Phi-3 keeps the pretraining length at the top level, and transformers prefers it there.
        values["original_max_position_embeddings"] = (
            cfg.get("original_max_position_embeddings") or values.get("original_max_position_embeddings") or context
        )
        for key in ("short_factor", "long_factor"):
            if key not in values:
                raise ValueError(f"longrope RoPE scaling needs {key}")
            values[key] = tuple(float(f) for f in values[key])
    values.setdefault("original_max_position_embeddings", context)
    if "factor" not in values:  # YaRN's and LongRoPE's default: the context extension itself
        original = values["original_max_position_embeddings"]
        extends = rope_type in ("yarn", "longrope") and context and original
        values["factor"] = context / original if extends else 1.0
    return theta, RopeScaling(rope_type=rope_type, **values)


def _partial_rotary_factor(cfg: dict[str, Any], arch: str) -> float:
    """The fraction of each head RoPE rotates: Phi-3's `partial_rotary_factor` (1 for the others,
    whose transformers code rotates whole heads)."""
    if arch != "Phi3ForCausalLM":
        return 1.0
    for source in (cfg, cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}):
        if source.get("partial_rotary_factor") is not None:
            factor = float(source["partial_rotary_factor"])
            if not 0.0 < factor <= 1.0:
                raise ValueError(f"partial_rotary_factor {factor} is not in (0, 1]")
            return factor
    return 1.0


def _activation(cfg: dict[str, Any], arch: str) -> str:
    """The gated MLP's activation: silu, or for Gemma the tanh-approximated GELU."""
    if arch in GEMMA_ARCHITECTURES:
        # Gemma 2 reads `hidden_activation`; Gemma 1 configs say "gelu" and mean the tanh form.
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
        if act not in ("gelu_pytorch_tanh", "silu"):
            raise ValueError(f"unsupported hidden_act {act!r}: Gemma supports gelu_pytorch_tanh and silu")
        return act
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only silu (SwiGLU) is implemented for {arch}")
    return act


def _window(cfg: dict[str, Any], arch: str) -> int | None:
    """The window of the windowed layers as transformers reads it (None: every layer attends fully)."""
    if arch in ALWAYS_WINDOWED_ARCHITECTURES:
        window = cfg.get("sliding_window", ALWAYS_WINDOWED_ARCHITECTURES[arch])
    elif arch in OPT_IN_WINDOW_ARCHITECTURES and cfg.get("use_sliding_window"):
        window = cfg.get("sliding_window", 4096)
    else:
        return None
    if window is None:
        return None
    if int(window) < 1:
        raise ValueError(f"sliding_window {window} must be at least 1")
    return int(window)


def _windowed_layers(cfg: dict[str, Any], arch: str, num_layers: int) -> list[bool]:
    """Which layers the window applies to: `layer_types` where the family reads it, else its default
    (Gemma 2: the even layers; Qwen2/Qwen3: from `max_window_layers` on; the others: all)."""
    types = cfg.get("layer_types") if arch in LAYER_TYPED_ARCHITECTURES else None
    if types is not None:
        if len(types) != num_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
        unknown = sorted(set(types) - {"sliding_attention", *_FULL_LAYER_TYPES})
        if unknown:
            raise ValueError(f"unsupported layer_types {unknown}: supported are sliding_attention and full_attention")
        return [t == "sliding_attention" for t in types]
    if arch == "Gemma2ForCausalLM":
        return [i % 2 == 0 for i in range(num_layers)]
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        first = int(cfg.get("max_window_layers", 28))
        return [i >= first for i in range(num_layers)]
    return [True] * num_layers


def _sliding_windows(cfg: dict[str, Any], arch: str, context: int) -> tuple[int | None, ...]:
    """Per layer, its attention window (None: full); () when no layer has one shorter than `context`."""
    layers = _windowed_layers(cfg, arch, int(cfg["num_hidden_layers"]))
    window = _window(cfg, arch)
    if window is None or window >= context or not any(layers):
        return ()
    return tuple(window if windowed else None for windowed in layers)


def _biases(cfg: dict[str, Any], arch: str) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias)."""
    if cfg.get("mlp_bias"):
        raise ValueError("MLP biases (mlp_bias=true) are not supported")
    if arch == "Qwen2ForCausalLM":
        return True, False
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        return False, False
    bias = bool(cfg.get("attention_bias", False))
    return bias, bias


def _moe_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(
        num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0)),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def _gemma2_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    def optional(key: str, default: float) -> float | None:  # absent: transformers' default; null: none
        value = cfg.get(key, default)
        return None if value is None else float(value)

    return dict(
        sandwich_norms=True,
        query_pre_attn_scalar=int(cfg.get("query_pre_attn_scalar") or 256),
        attn_logit_softcapping=optional("attn_logit_softcapping", 50.0),
        final_logit_softcapping=optional("final_logit_softcapping", 30.0),
    )


def config_from_hf(cfg: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """Build a ModelConfig from config.json (and generation_config.json, for eos/bos ids)."""
    arch = architecture_of(cfg)
    heads = int(cfg["num_attention_heads"])
    eos: list[int] = []
    for i in _id_list((generation or {}).get("eos_token_id")) + _id_list(cfg.get("eos_token_id")):
        if i not in eos:
            eos.append(i)
    theta, scaling = _rope(cfg, arch)
    qkv_bias, o_proj_bias = _biases(cfg, arch)
    gemma, gemma2 = arch in GEMMA_ARCHITECTURES, arch == "Gemma2ForCausalLM"
    context = int(cfg.get("max_position_embeddings", 32768))
    config = ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=context,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),  # transformers' defaults
        qkv_bias=qkv_bias,
        o_proj_bias=o_proj_bias,
        qk_norm=arch in QK_NORM_ARCHITECTURES,
        hidden_act=_activation(cfg, arch),
        partial_rotary_factor=_partial_rotary_factor(cfg, arch),
        fused_projections=arch == "Phi3ForCausalLM",
        rms_norm_unit_offset=gemma,
        scale_embeddings=gemma,
        **(_gemma2_fields(cfg) if gemma2 else {}),
        sliding_windows=_sliding_windows(cfg, arch, context),
        eos_token_ids=tuple(eos),
        bos_token_id=(generation or {}).get("bos_token_id", cfg.get("bos_token_id")),
        **(_moe_fields(cfg) if arch == "Qwen3MoeForCausalLM" else {}),
    )
    if config.rotary_dim < 2 or config.rotary_dim % 2:
        raise ValueError(
            f"partial_rotary_factor {config.partial_rotary_factor} leaves {config.rotary_dim} "
            f"rotary dims of {config.head_dim}: RoPE needs an even number"
        )
    rope = config.rope_scaling
    if rope is not None and rope.rope_type == "longrope":
        for name, factors in (("short_factor", rope.short_factor), ("long_factor", rope.long_factor)):
            if len(factors or ()) != config.rotary_dim // 2:
                raise ValueError(
                    f"longrope {name} has {len(factors or ())} entries; the model rotates "
                    f"{config.rotary_dim} dims of each head, so it needs {config.rotary_dim // 2}"
                )
    return config
