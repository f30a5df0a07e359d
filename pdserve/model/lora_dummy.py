"""Random LoRA adapters in PEFT's format for any ModelConfig: the adapter-side twin of
`dummy:<preset>` models, for benchmarks and tests that need no PEFT and no download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdserve.config import ModelConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def save_random_adapter(
    out: str | Path, config: ModelConfig, rank: int, seed: int = 0, targets: tuple[str, ...] = ATTENTION + MLP,
    std: float = 0.01,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` with N(0, std) A and B on `targets`
    of every layer (dense MLPs only). Returns the directory."""
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    shapes = {"q_proj": (h, config.num_attention_heads * hd), "k_proj": (h, config.num_key_value_heads * hd),
              "v_proj": (h, config.num_key_value_heads * hd), "o_proj": (config.num_attention_heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for t in targets:
            if t in MLP and config.is_sparse_layer(layer):
                continue
            key = f"base_model.model.model.layers.{layer}.{'self_attn' if t in ATTENTION else 'mlp'}.{t}"
            fan_in, fan_out = shapes[t]
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * std
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}))
    return out
