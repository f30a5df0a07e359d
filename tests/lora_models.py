"""A tiny transformers Qwen3 checkpoint and PEFT LoRA adapters over it (random A and B), for tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base: torch.nn.Module, out: Path, seed: int, **lora_kw) -> torch.nn.Module:
    """A PEFT LoRA over a copy of `base` with random A and B (PEFT starts B at zero), saved to `out`."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    return model.eval()


def make_base_and_adapters(root: Path) -> dict[str | None, torch.nn.Module]:
    """root/base (the model), root/a (rank 8 on every linear), root/b (rsLoRA rank 4 on q and v)."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base.save_pretrained(root / "base")
    a = save_adapter(base, root / "a", 1, r=8, lora_alpha=16, target_modules=ALL_TARGETS)
    b = save_adapter(base, root / "b", 2, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    return {None: base, "a": a, "b": b}
