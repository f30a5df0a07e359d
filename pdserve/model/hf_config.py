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
| Gemma3ForCausalLM    | (1 + w)  | `attention_bias`    | Gemma 2 without attention soft-capping; sliding    |
|                      |          |                     | layers (`layer_types`, default: 5 of each 6 by     |
|                      |          |                     | `sliding_window_pattern`) window and use the local |
|                      |          |                     | RoPE, the others the global one (scaled)           |

RoPE scalings: linear, llama3, yarn, longrope (rope.py). Activations: silu, and for the Gemma
families the tanh-approximated GELU (their configs' legacy "gelu" means it too, as in transformers).
Sliding windows follow transformers' reading of config.json, defaults included (`sliding_window`
4096 where absent, but none for Phi-3): they become ModelConfig.sliding_windows, one entry per
layer, kept only where the window is shorter than the context (max_position_embeddings).

Gemma 3's two RoPEs are read as transformers' Gemma3TextConfig reads them: `rope_parameters` keyed
by layer type (`full_attention`, `sliding_attention`; what transformers 5 writes), or the released
checkpoints' `rope_theta` + `rope_scaling` for the global layers and `rope_local_base_freq`,
unscaled, for the local ones. Its `attn_logit_softcapping` is ignored, as transformers' Gemma 3
attention (and vLLM's) ignores it. The multimodal Gemma3ForConditionalGeneration is refused.
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
    "Gemma3ForCausalLM": "gemma3_text",
}
# Known architectures that are not served, and why.
REFUSED_ARCHITECTURES = {
    "Gemma3ForConditionalGeneration": (
        "Gemma 3 with its vision tower (model_type gemma3) is not supported; pdserve serves the "
        "text-only Gemma3ForCausalLM checkpoints (model_type gemma3_text, e.g. google/gemma-3-1b-it)"
    ),
}
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM")
GEMMA_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
SANDWICH_NORM_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# transformers' window where config.json has no `sliding_window`, for the families that always window
# (those of OPT_IN_WINDOW_ARCHITECTURES window only with `use_sliding_window`).
ALWAYS_WINDOWED_ARCHITECTURES: dict[str, int | None] = {
    "MistralForCausalLM": 4096,
    "Phi3ForCausalLM": None,
    "Gemma2ForCausalLM": 4096,
    "Gemma3ForCausalLM": 4096,
}
OPT_IN_WINDOW_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# Families whose config reads `layer_types` to pick the windowed layers; the others window every layer.
LAYER_TYPED_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_FULL_LAYER_TYPES = ("full_attention", "attention")  # "attention": transformers' legacy name
_ROPE_FIELDS = {f.name for f in fields(RopeScaling)} - {"rope_type"}
_GEMMA3_LAYER_TYPES = ("full_attention", "sliding_attention")
Rope = tuple[float, RopeScaling | None]  # (theta, scaling)


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
    for arch in archs:
        if arch in REFUSED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}: {REFUSED_ARCHITECTURES[arch]}")
    by_type = {t: a for a, t in MODEL_TYPES.items()}
    if not archs and cfg.get("model_type") in by_type:
        return by_type[cfg["model_type"]]
    found = archs or cfg.get("model_type")
    raise ValueError(
        f"unsupported architecture {found!r}; supported: {', '.join(MODEL_TYPES)} "
        f"(model_type {', '.join(MODEL_TYPES.values())})"
    )


def _rope(cfg: dict[str, Any], arch: str) -> Rope:
    """(theta, scaling) from `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or 10_000.0)
    return theta, _rope_scaling(scaling, cfg, arch)


def _gemma3_rope(cfg: dict[str, Any]) -> tuple[Rope, Rope]:
    """Gemma 3's (global, local) RoPE, as Gemma3TextConfig reads them (module doc): a `rope_scaling`
    updates the full-attention parameters; the thetas default to 1e6 and 1e4."""
    params = cfg.get("rope_parameters") or {}
    unknown = sorted(set(params) - set(_GEMMA3_LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"Gemma 3 rope_parameters are keyed by layer type ({', '.join(_GEMMA3_LAYER_TYPES)}); "
            f"unsupported keys {unknown}"
        )
    full = {**(params.get("full_attention") or {}), **(cfg.get("rope_scaling") or {})}
    full.setdefault("rope_theta", cfg.get("rope_theta") or 1_000_000.0)
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq") or 10_000.0)
    arch = "Gemma3ForCausalLM"
    return (
        (float(full["rope_theta"]), _rope_scaling(full, cfg, arch)),
        (float(local["rope_theta"]), _rope_scaling(local, cfg, arch)),
    )


def _rope_scaling(scaling: dict[str, Any], cfg: dict[str, Any], arch: str) -> RopeScaling | None:
    """The RopeScaling of one `rope_scaling` / `rope_parameters` dict (None: unscaled)."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if arch == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # early Phi-3 configs' names for it (transformers maps them too)
    if rope_type in (None, "default"):
        return None
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
    return RopeScaling(rope_type=rope_type, **values)


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
        # Gemma 2 and 3 read `hidden_activation`; Gemma 1 configs say "gelu" and mean the tanh form.
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
    (Gemma 2: the even layers; Gemma 3: all but every `sliding_window_pattern`-th; Qwen2/Qwen3: from
    `max_window_layers` on; the others: all)."""
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
    if arch == "Gemma3ForCausalLM":
        pattern = cfg.get("sliding_window_pattern")
        pattern = 6 if pattern is None else int(pattern)  # transformers' default: 5 local, then 1 global
        if pattern < 1:
            raise ValueError(f"sliding_window_pattern {pattern} must be at least 1")
        return [(i + 1) % pattern != 0 for i in range(num_layers)]
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        first = int(cfg.get("max_window_layers", 28))
        return [i >= first for i in range(num_layers)]
    return [True] * num_layers


def _sliding_windows(cfg: dict[str, Any], arch: str, context: int) -> tuple[int | None, ...]:
    """Per layer, its attention window (None: full); () when no layer has one shorter than `context`."""
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is not supported: pdserve's attention is causal")
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


def _sandwich_fields(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """Gemma 2 and 3: output norms, attention scale and soft-caps (absent: transformers' default,
    which Gemma 3 has none of; null: none). Gemma 3 never soft-caps attention (module doc)."""

    def optional(key: str, default: float | None) -> float | None:
        value = cfg.get(key, default)
        return None if value is None else float(value)

    gemma2 = arch == "Gemma2ForCausalLM"
    return dict(
        sandwich_norms=True,
        query_pre_attn_scalar=int(cfg.get("query_pre_attn_scalar") or 256),
        attn_logit_softcapping=optional("attn_logit_softcapping", 50.0) if gemma2 else None,
        final_logit_softcapping=optional("final_logit_softcapping", 30.0 if gemma2 else None),
    )


def _rope_fields(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """ModelConfig's RoPE: rope_theta and rope_scaling, and for Gemma 3 the local RoPE of its
    sliding-attention layers too."""
    if arch != "Gemma3ForCausalLM":
        theta, scaling = _rope(cfg, arch)
        return dict(rope_theta=theta, rope_scaling=scaling)
    (theta, scaling), (local_theta, local_scaling) = _gemma3_rope(cfg)
    local_layers = _windowed_layers(cfg, arch, int(cfg["num_hidden_layers"]))
    return dict(
        rope_theta=theta,
        rope_scaling=scaling,
        local_rope_layers=tuple(local_layers) if any(local_layers) else (),
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
    )


def _check_rotary(config: ModelConfig) -> None:
    """ValueError unless RoPE rotates an even number of dims, with a LongRoPE factor for each pair."""
    if config.rotary_dim < 2 or config.rotary_dim % 2:
        raise ValueError(
            f"partial_rotary_factor {config.partial_rotary_factor} leaves {config.rotary_dim} "
            f"rotary dims of {config.head_dim}: RoPE needs an even number"
        )
    for rope in (config.rope_scaling, config.local_rope_scaling):
        if rope is not None and rope.rope_type == "longrope":
            for name, factors in (("short_factor", rope.short_factor), ("long_factor", rope.long_factor)):
                if len(factors or ()) != config.rotary_dim // 2:
                    raise ValueError(
                        f"longrope {name} has {len(factors or ())} entries; the model rotates "
                        f"{config.rotary_dim} dims of each head, so it needs {config.rotary_dim // 2}"
                    )


def config_from_hf(cfg: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """Build a ModelConfig from config.json (and generation_config.json, for eos/bos ids)."""
    arch = architecture_of(cfg)
    heads = int(cfg["num_attention_heads"])
    eos: list[int] = []
    for i in _id_list((generation or {}).get("eos_token_id")) + _id_list(cfg.get("eos_token_id")):
        if i not in eos:
            eos.append(i)
    qkv_bias, o_proj_bias = _biases(cfg, arch)
    gemma = arch in GEMMA_ARCHITECTURES
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
        **_rope_fields(cfg, arch),
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
        **(_sandwich_fields(cfg, arch) if arch in SANDWICH_NORM_ARCHITECTURES else {}),
        sliding_windows=_sliding_windows(cfg, arch, context),
        eos_token_ids=tuple(eos),
        bos_token_id=(generation or {}).get("bos_token_id", cfg.get("bos_token_id")),
        **(_moe_fields(cfg) if arch == "Qwen3MoeForCausalLM" else {}),
    )
    _check_rotary(config)
    return config
