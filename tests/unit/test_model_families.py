"""Checkpoints written by transformers itself (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2;
RoPE scalings) load in pdserve and give transformers' logits over the paged cache: a prefill in two
chunks, then decodes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pdserve.model.hf_config import config_from_hf
from pdserve.model.loader import load_model
from pdserve.model.rope import rope_inv_freq
from tests.unit.paged import PROMPT_LEN, assert_close, make_meta, new_cache, run

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)
# Scalings with a short original context, so that they change the 40 positions the test runs.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}


def _longrope(n: int) -> dict:
    """LongRoPE over n frequencies, with short and long factors that differ from each other and from 1."""
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(n)],
            "long_factor": [1.5 + 0.5 * i for i in range(n)]}


PHI3 = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Gemma 2 with weights large enough that both soft-caps bend the values they cap, and a window (128)
# longer than the test's 40 tokens but shorter than max_position_embeddings (256).
GEMMA2 = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=128, attn_logit_softcapping=2.0,
              final_logit_softcapping=1.5, initializer_range=0.2, tie_word_embeddings=True)

FAMILIES = {
    "llama3-bias": (transformers.LlamaConfig, dict(attention_bias=True, rope_parameters=LLAMA3)),
    "llama-linear": (transformers.LlamaConfig, dict(rope_parameters=LINEAR)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen3-yarn": (transformers.Qwen3Config, dict(head_dim=16, rope_parameters=YARN)),
    "phi3": (transformers.Phi3Config, PHI3),
    # 40 positions > original 16: the long factors, in transformers and (context 256 > 16) here.
    "phi3-longrope": (transformers.Phi3Config, dict(PHI3, rope_parameters=_longrope(8),
                                                    original_max_position_embeddings=16)),
    # Half of each head rotated; context = original: the short factors, in both.
    "phi3-partial-short": (transformers.Phi3Config, dict(PHI3, partial_rotary_factor=0.5, rope_parameters=_longrope(4),
                                                         original_max_position_embeddings=256)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": (transformers.Gemma2Config, GEMMA2),
}


def _hf_checkpoint(out: Path, config_cls, extra: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config_cls(**{**SMALL, **extra}), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:  # != 1 / != 0, so a misnamed one shows up
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    hf.save_pretrained(out)
    return hf.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = _hf_checkpoint(out, *FAMILIES[request.param])
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    lm = load_model(str(out), torch.float32, "cpu")
    assert lm.config.architecture == type(hf).__name__
    return lm, ids, ref


def test_transformers_checkpoint_matches_transformers(family):
    lm, ids, ref = family
    kv = new_cache(lm)
    blocks = [5, 2, 7]
    meta, pos = make_meta([], [(blocks, 0, 25)])
    assert_close(run(lm, ids[:25], kv, meta, pos), ref[:25])
    meta, pos = make_meta([], [(blocks, 25, 14)])
    assert_close(run(lm, ids[25:39], kv, meta, pos), ref[25:39])
    meta, pos = make_meta([(blocks, 39)], [])
    assert_close(run(lm, ids[39:40], kv, meta, pos), ref[39:40])


@pytest.mark.parametrize("scaling", [None, LINEAR, LLAMA3, YARN], ids=["default", "linear", "llama3", "yarn"])
def test_rope_frequencies_equal_transformers(scaling):
    cfg = transformers.LlamaConfig(**SMALL, rope_parameters=scaling or {"rope_type": "default", "rope_theta": 1e4})
    rope_type = (scaling or {}).get("rope_type", "default")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type == "default":
        expected, factor = 1.0 / (1e4 ** (torch.arange(0, 16, 2).float() / 16)), 1.0
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    ours = config_from_hf(cfg.to_dict())
    got, got_factor = rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    torch.testing.assert_close(got, expected.float())
    assert got_factor == pytest.approx(factor)


def _cfg(**over) -> dict:
    return {"architectures": ["LlamaForCausalLM"], **SMALL, **over}


def test_config_flags_per_family():
    qwen2 = config_from_hf(_cfg(architectures=["Qwen2ForCausalLM"]))
    assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    llama = config_from_hf(_cfg(attention_bias=True))
    assert (llama.qkv_bias, llama.o_proj_bias, llama.qk_norm) == (True, True, False)
    qwen3 = config_from_hf(_cfg(architectures=["Qwen3ForCausalLM"]))
    assert (qwen3.qkv_bias, qwen3.qk_norm) == (False, True)
    # transformers 4 style: rope_theta + rope_scaling with "type".
    old = config_from_hf(_cfg(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0}))
    assert old.rope_theta == 5e5 and old.rope_scaling.rope_type == "linear" and old.rope_scaling.factor == 4.0


def test_sliding_window_caps_the_context(caplog):
    with caplog.at_level(logging.WARNING):
        mistral = config_from_hf(_cfg(architectures=["MistralForCausalLM"], sliding_window=64))
    assert mistral.max_position_embeddings == 64 and "sliding-window" in caplog.text
    unwindowed = config_from_hf(_cfg(architectures=["MistralForCausalLM"], sliding_window=None))
    assert unwindowed.max_position_embeddings == 256
    # Qwen2 configs carry a window they do not use unless use_sliding_window is set.
    qwen2 = _cfg(architectures=["Qwen2ForCausalLM"], sliding_window=32)
    assert config_from_hf(qwen2).max_position_embeddings == 256
    assert config_from_hf({**qwen2, "use_sliding_window": True}).max_position_embeddings == 32


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "unsupported rope scaling 'dynamic'"),
        (dict(rope_scaling={"rope_type": "longrope"}), "supported are default, linear, llama3 and yarn"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
        (dict(architectures=["Phi3ForCausalLM"]), "unsupported architecture.*Phi3ForCausalLM"),
    ],
)
def test_unsupported_configs_are_named(over, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(_cfg(**over))
