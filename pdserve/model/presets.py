"""Named model shapes for `dummy:<preset>` models (random weights, byte tokenizer).

The byte tokenizer puts <|endoftext|>, <|im_start|>, <|im_end|> at ids 256-258, so every preset has
vocab_size >= 259 and eos ids (<|im_end|>, <|endoftext|>).
"""

from __future__ import annotations

from pdserve.config import ModelConfig, RopeScaling

BYTE_EOS_IDS = (258, 256)  # <|im_end|>, <|endoftext|> in the byte tokenizer

PRESETS: dict[str, ModelConfig] = {
    # Fast tests.
    "qwen3-tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,  # tied + tiny random weights would just echo the last token
        eos_token_ids=BYTE_EOS_IDS,
    ),
    # Layer 0 dense (mlp_only_layers), layers 1-2 sparse.
    "qwen3-moe-tiny": ModelConfig(
        architecture="Qwen3MoeForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=(0,),
        eos_token_ids=BYTE_EOS_IDS,
    ),
    # The other dense families at test size: Llama (no q/k norm, llama3 RoPE scaling) and Qwen2
    # (q/k/v biases, no q/k norm), with the byte tokenizer's ChatML.
    "llama-tiny": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=500_000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=512),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        qk_norm=False,
        eos_token_ids=BYTE_EOS_IDS,
    ),
    "qwen2-tiny": ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        qkv_bias=True,
        qk_norm=False,
        eos_token_ids=BYTE_EOS_IDS,
    ),
    # Mistral at test size: every layer windowed (16 tokens), so blocks slide out of sight and are
    # freed while the request runs (engine/sliding_window.py).
    "mistral-tiny": ModelConfig(
        architecture="MistralForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        qk_norm=False,
        sliding_windows=(16, 16),
        eos_token_ids=BYTE_EOS_IDS,
    ),
    # Gemma 3 at test size: local layers (16-token window, RoPE base 1e4 unscaled) around a global
    # one (base 1e6, linear scaling as in the 4B-27B checkpoints), (1 + w) norms on q and k too.
    "gemma3-tiny": ModelConfig(
        architecture="Gemma3ForCausalLM",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=1_000_000.0,
        rope_scaling=RopeScaling("linear", factor=8.0, original_max_position_embeddings=4096),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        hidden_act="gelu_pytorch_tanh",
        rms_norm_unit_offset=True,
        scale_embeddings=True,
        sandwich_norms=True,
        query_pre_attn_scalar=32,
        sliding_windows=(16, None, 16),
        local_rope_layers=(True, False, True),
        local_rope_theta=10_000.0,
        eos_token_ids=BYTE_EOS_IDS,
    ),
    # CPU benchmark: compute-heavy enough that prefill and decode differ, small vocab.
    "qwen3-cpu-bench": ModelConfig(
        vocab_size=1024,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_ids=BYTE_EOS_IDS,
    ),
    # Real Qwen3 shapes.
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        eos_token_ids=BYTE_EOS_IDS,
    ),
    "qwen3-8b": ModelConfig(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        eos_token_ids=BYTE_EOS_IDS,
    ),
    "qwen3-30b-a3b": ModelConfig(
        architecture="Qwen3MoeForCausalLM",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        eos_token_ids=BYTE_EOS_IDS,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The ModelConfig of preset `name`; ValueError listing the known presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
