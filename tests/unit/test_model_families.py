"""Checkpoints written by transformers itself (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2,
Gemma 3; RoPE scalings; sliding windows) load in pdserve and give transformers' logits over the paged cache:
a prefill in two chunks, then decodes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pdserve import LLM, LoRARequest, SamplingParams
from pdserve.config import LoRAConfig
from pdserve.engine.lora import LoRAManager
from pdserve.model.cpu_linear import can_prepack, prepack_linears_
from pdserve.model.decoder import RMSNorm, fuse_projections_
from pdserve.model.export import hf_config_dict, save_hf_dir
from pdserve.model.hf_config import config_from_hf
from pdserve.model.loader import LoadedModel, build_model, init_random_, load_model
from pdserve.model.rope import rope_inv_freq
from tests.lora_models import save_adapter
from tests.unit.paged import PROMPT_LEN, assert_close, make_meta, new_cache, run

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
# Scalings with a short original context, so that they change the 40 positions the test runs.
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}


def _longrope(n: int) -> dict:
    """LongRoPE over n frequencies, with short and long factors that differ from each other and from 1."""
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(n)],
        "long_factor": [1.5 + 0.5 * i for i in range(n)],
    }


PHI3 = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Gemma 2 with weights large enough that both soft-caps bend the values they cap, and a window of 7
# on layer 0 (transformers' default layer_types: the even layers), far shorter than the 40 tokens.
GEMMA2 = dict(
    head_dim=32,
    query_pre_attn_scalar=24,
    sliding_window=7,
    attn_logit_softcapping=2.0,
    final_logit_softcapping=1.5,
    initializer_range=0.2,
    tie_word_embeddings=True,
)

# Gemma 3: layers sliding (window 7), full, sliding (sliding_window_pattern 2), so a local layer comes
# after the global one; the global RoPE linear-scaled on another base than the local one; an
# attn_logit_softcapping that transformers' Gemma 3 ignores (and so must pdserve).
GEMMA3 = dict(
    num_hidden_layers=3,
    head_dim=32,
    query_pre_attn_scalar=24,
    sliding_window=7,
    sliding_window_pattern=2,
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0},
    },
    attn_logit_softcapping=2.0,
    initializer_range=0.2,
    tie_word_embeddings=True,
)

FAMILIES = {
    "llama3-bias": (transformers.LlamaConfig, dict(attention_bias=True, rope_parameters=LLAMA3)),
    "llama-linear": (transformers.LlamaConfig, dict(rope_parameters=LINEAR)),
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=6, head_dim=16)),  # every layer
    "qwen2": (transformers.Qwen2Config, dict()),
    # The window on the layers from max_window_layers on: layer 1, not layer 0.
    "qwen2-window": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3-yarn": (transformers.Qwen3Config, dict(head_dim=16, rope_parameters=YARN)),
    "phi3-window": (transformers.Phi3Config, dict(PHI3, sliding_window=8)),
    # 40 positions > original 16: the long factors, in transformers and (context 256 > 16) here.
    "phi3-longrope": (
        transformers.Phi3Config,
        dict(PHI3, rope_parameters=_longrope(8), original_max_position_embeddings=16),
    ),
    # Half of each head rotated; context = original: the short factors, in both.
    "phi3-partial-short": (
        transformers.Phi3Config,
        dict(PHI3, partial_rotary_factor=0.5, rope_parameters=_longrope(4), original_max_position_embeddings=256),
    ),
    "gemma": (transformers.GemmaConfig, dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": (transformers.Gemma2Config, GEMMA2),
    "gemma3": (transformers.Gemma3TextConfig, GEMMA3),
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


@dataclass
class Family:
    dir: Path  # the checkpoint transformers wrote
    hf: torch.nn.Module
    lm: LoadedModel  # pdserve's float32 load of it
    ids: torch.Tensor
    ref: torch.Tensor  # transformers' float32 logits for ids


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = _hf_checkpoint(out, *FAMILIES[request.param])
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    lm = load_model(str(out), torch.float32, "cpu")
    assert lm.config.architecture == type(hf).__name__
    return Family(out, hf, lm, ids, ref)


def _chunked_logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a prefill in two chunks (24 + 10 tokens) and six decodes, over the paged cache. With
    the families' windows (5 to 8 tokens) the second chunk's window starts past the first block."""
    kv = new_cache(lm)
    blocks = [5, 2, 7]
    steps = [([], [(blocks, 0, 24)]), ([], [(blocks, 24, 10)])] + [([(blocks, p)], []) for p in range(34, PROMPT_LEN)]
    out = []
    for decodes, prefills in steps:
        meta, pos = make_meta(decodes, prefills)
        out.append(run(lm, ids[pos], kv, meta, pos))
    return torch.cat(out)


def test_transformers_checkpoint_matches_transformers(family):
    assert_close(_chunked_logits(family.lm, family.ids), family.ref)


def test_bf16_engine_path_is_as_close_as_transformers_bf16(family):
    """bf16 with the engine's CPU layout (fused q/k/v and gate/up, prepacked linears): as far from
    the float32 logits as transformers' own bf16 model is. (Greedy tokens of these random models
    have near-ties that bf16 rounding flips either way, so logits are the sharper check.)"""
    lm = load_model(str(family.dir), torch.bfloat16, "cpu")
    if can_prepack(lm.device, lm.dtype):
        assert prepack_linears_(lm.module) > 0
    else:
        fuse_projections_(lm.module)
    err = (_chunked_logits(lm, family.ids) - family.ref).abs().max().item()
    hf_bf16 = copy.deepcopy(family.hf).to(torch.bfloat16)
    with torch.no_grad():
        hf_err = (hf_bf16(family.ids[None]).logits[0].float() - family.ref).abs().max().item()
    assert err < 2 * hf_err + 1e-3, (err, hf_err)


def test_export_gives_transformers_the_same_model(family, tmp_path):
    """pdserve's export of the loaded model (config.json from ModelConfig, weights by name) loads in
    transformers with every weight in place and gives the original logits."""
    lm = family.lm
    out = save_hf_dir(tmp_path, lm.config, lm.module.state_dict(), lm.tokenizer)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert_close(hf(family.ids[None]).logits[0].float(), family.ref)
    assert load_model(str(out), torch.float32, "cpu").config == lm.config


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


@pytest.mark.parametrize(
    ("original", "partial", "factors"), [(16, 1.0, "long"), (256, 1.0, "short"), (16, 0.5, "long")]
)
def test_longrope_frequencies_equal_transformers(original, partial, factors):
    """The factor set is chosen once, by the served context (256) against original_max_position_embeddings:
    transformers' choice for a sequence that long."""
    n = int(16 * partial) // 2
    cfg = transformers.Phi3Config(
        **SMALL,
        **PHI3,
        rope_parameters=_longrope(n),
        partial_rotary_factor=partial,
        original_max_position_embeddings=original,
    )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    expected, factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=SMALL["max_position_embeddings"])
    ours = config_from_hf(cfg.to_dict())
    assert ours.rotary_dim == 2 * n
    got, got_factor = rope_inv_freq(
        ours.rotary_dim, ours.rope_theta, ours.rope_scaling, None, ours.max_position_embeddings
    )
    torch.testing.assert_close(got, expected.float())
    assert got_factor == pytest.approx(factor) and (factor > 1) == (factors == "long")
    chosen = getattr(ours.rope_scaling, f"{factors}_factor")
    torch.testing.assert_close(got, 1.0 / (torch.tensor(chosen) * 1e4 ** (torch.arange(0, 2 * n, 2) / (2 * n))))


def test_longrope_factor_set_follows_the_served_context():
    """As vLLM: the long factors when max_model_len exceeds original_max_position_embeddings, the
    short ones when `--max-model-len` keeps the context within it (here 16 of the model's 256)."""
    cfg = transformers.Phi3Config(**SMALL, **PHI3, rope_parameters=_longrope(8), original_max_position_embeddings=16)
    ours = config_from_hf(cfg.to_dict())
    model = build_model(ours, torch.float32, "cpu")
    rotary, pos = model.model.rotary, torch.tensor([1])
    for served, factors in ((256, ours.rope_scaling.long_factor), (16, ours.rope_scaling.short_factor)):
        model.serve_context(served)
        cos, _ = rotary(pos, torch.float32)
        inv_freq = 1.0 / (torch.tensor(factors) * 1e4 ** (torch.arange(0, 16, 2) / 16))
        _, attention = rope_inv_freq(ours.rotary_dim, ours.rope_theta, ours.rope_scaling, None, served)
        torch.testing.assert_close(cos.flatten(), torch.cos(inv_freq) * attention)
        assert rotary.max_positions == served


def test_max_model_len_past_the_models_positions_is_refused():
    with pytest.raises(ValueError, match="--max-model-len 4097 exceeds the model's max_position_embeddings"):
        LLM(model="dummy:qwen3-tiny", max_model_len=4097)


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
    for c in (qwen2, llama, qwen3):
        assert c.hidden_act == "silu" and not (c.fused_projections or c.rms_norm_unit_offset or c.scale_embeddings)


def test_phi3_config():
    # Phi-3.5-mini's shape of config: top-level original_max_position_embeddings, "longrope" factors.
    factors = dict(short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    phi = config_from_hf(
        _cfg(
            architectures=["Phi3ForCausalLM"],
            attention_bias=True,
            rope_theta=1e4,
            original_max_position_embeddings=64,
            rope_scaling={"type": "longrope", **factors},
        )
    )
    assert (phi.fused_projections, phi.qkv_bias, phi.o_proj_bias, phi.hidden_act) == (True, False, False, "silu")
    s = phi.rope_scaling
    assert (s.rope_type, s.original_max_position_embeddings, s.factor) == ("longrope", 64, 4.0)
    assert s.long_factor == (2.0,) * 8 and phi.partial_rotary_factor == 1.0 and phi.rotary_dim == 16
    # Early Phi-3 configs call it "su" (or "yarn"), as transformers still reads them.
    su = config_from_hf(_cfg(architectures=["Phi3ForCausalLM"], rope_scaling={"type": "su", **factors}))
    assert su.rope_scaling.rope_type == "longrope"
    partial = config_from_hf(_cfg(architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.75))
    assert (partial.partial_rotary_factor, partial.rotary_dim) == (0.75, 12)
    # Only Phi-3's transformers code rotates part of a head.
    assert config_from_hf(_cfg(partial_rotary_factor=0.5)).rotary_dim == 16


def test_gemma_configs():
    gemma = config_from_hf(_cfg(architectures=["GemmaForCausalLM"], head_dim=32, hidden_act="gelu"))
    assert gemma.hidden_act == "gelu_pytorch_tanh"  # Gemma's legacy "gelu" means the tanh form
    assert (gemma.rms_norm_unit_offset, gemma.scale_embeddings, gemma.head_dim, gemma.sandwich_norms) == (
        True,
        True,
        32,
        False,
    )
    untied = {k: v for k, v in _cfg(architectures=["GemmaForCausalLM"]).items() if k != "tie_word_embeddings"}
    assert config_from_hf(untied).tie_word_embeddings  # transformers' default for Gemma
    assert gemma.attn_logit_softcapping is gemma.final_logit_softcapping is gemma.query_pre_attn_scalar is None
    dummy = build_model(gemma, torch.float32, "cpu")
    init_random_(dummy)  # (1 + weight) norms start at weight 0: the identity scale
    assert all(not m.weight.any() for m in dummy.modules() if isinstance(m, RMSNorm))
    gemma2 = config_from_hf(
        _cfg(
            architectures=["Gemma2ForCausalLM"],
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=144,
            final_logit_softcapping=None,
        )
    )
    assert (gemma2.sandwich_norms, gemma2.query_pre_attn_scalar, gemma2.hidden_act) == (True, 144, "gelu_pytorch_tanh")
    # Absent: transformers' defaults (50); null: none.
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (50.0, None)


# google/gemma-3-1b-it's config.json as released (written by transformers 4.50).
GEMMA3_1B_IT = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "use_cache": True,
    "vocab_size": 262144,
}


def _gemma3_layers_as_transformers(hf_cfg) -> tuple[tuple[int | None, ...], tuple[bool, ...]]:
    """(windows, local-RoPE layers) as transformers' Gemma3TextConfig reads a config."""
    local = tuple(t == "sliding_attention" for t in hf_cfg.layer_types)
    return tuple(hf_cfg.sliding_window if is_local else None for is_local in local), local


def test_gemma3_1b_it_config():
    """The released config.json: q/k norms, Gemma's norms, embedding scale and GeGLU, sandwich norms,
    no soft-capping, a 512 window and the local RoPE on 5 layers of each 6, as transformers reads it."""
    c = config_from_hf(GEMMA3_1B_IT, {"bos_token_id": 2, "eos_token_id": [1, 106]})
    assert (c.architecture, c.qk_norm, c.rms_norm_unit_offset, c.scale_embeddings, c.sandwich_norms) == (
        "Gemma3ForCausalLM",
        True,
        True,
        True,
        True,
    )
    assert (c.hidden_act, c.query_pre_attn_scalar, c.head_dim, c.num_key_value_heads) == (
        "gelu_pytorch_tanh",
        256,
        256,
        1,
    )
    assert c.attn_logit_softcapping is c.final_logit_softcapping is None
    assert (c.tie_word_embeddings, c.qkv_bias, c.o_proj_bias, c.max_position_embeddings) == (True, False, False, 32768)
    assert (c.eos_token_ids, c.bos_token_id) == ((1, 106), 2)
    assert (c.rope_theta, c.rope_scaling, c.local_rope_theta, c.local_rope_scaling) == (1e6, None, 1e4, None)
    assert c.sliding_windows == tuple(None if i % 6 == 5 else 512 for i in range(26))
    assert c.local_rope_layers == tuple(w is not None for w in c.sliding_windows)
    hf = transformers.Gemma3TextConfig.from_dict(GEMMA3_1B_IT)
    assert (c.sliding_windows, c.local_rope_layers) == _gemma3_layers_as_transformers(hf)
    # The same model as transformers 5 writes it: layer_types and rope_parameters per layer type.
    assert config_from_hf(hf.to_dict(), {"eos_token_id": [1, 106]}) == c


@pytest.mark.parametrize("form", ["released", "transformers5"])
def test_gemma3_rope_per_layer_type_equals_transformers(form):
    """4B-27B style: `rope_scaling` (linear, factor 8) scales the global layers only; the local ones
    rotate unscaled on rope_local_base_freq. Both tables' frequencies equal transformers'."""
    cfg = {**GEMMA3_1B_IT, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "num_hidden_layers": 8}
    hf = transformers.Gemma3TextConfig.from_dict(cfg)
    if form == "transformers5":
        cfg = hf.to_dict()
    c = config_from_hf(cfg)
    assert (c.rope_theta, c.rope_scaling.rope_type, c.rope_scaling.factor) == (1e6, "linear", 8.0)
    assert (c.local_rope_theta, c.local_rope_scaling) == (1e4, None)
    assert (c.sliding_windows, c.local_rope_layers) == _gemma3_layers_as_transformers(hf)
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    rotary = Gemma3RotaryEmbedding(hf)
    for layer_type, theta, scaling in (
        ("full_attention", c.rope_theta, c.rope_scaling),
        ("sliding_attention", c.local_rope_theta, c.local_rope_scaling),
    ):
        got, factor = rope_inv_freq(c.rotary_dim, theta, scaling)
        torch.testing.assert_close(got, getattr(rotary, f"{layer_type}_inv_freq"))
        assert factor == getattr(rotary, f"{layer_type}_attention_scaling")


def test_gemma3_config_defaults_and_export():
    """transformers' defaults where config.json is silent (window 4096 on 5 of 6 layers, thetas 1e6
    and 1e4, no soft-caps: Gemma 2's defaults do not carry over), and a scaled local RoPE, which only
    `rope_parameters` can say, exported so that transformers and pdserve read it back."""
    bare = config_from_hf(_cfg(architectures=["Gemma3ForCausalLM"], num_hidden_layers=7, max_position_embeddings=8192))
    assert bare.sliding_windows == (4096,) * 5 + (None, 4096)
    assert bare.local_rope_layers == (True,) * 5 + (False, True)
    assert (bare.rope_theta, bare.local_rope_theta, bare.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert bare.attn_logit_softcapping is bare.final_logit_softcapping is None
    # A window no shorter than the context: no windows, but the local layers keep their RoPE.
    long = config_from_hf(_cfg(architectures=["Gemma3ForCausalLM"], sliding_window=512, sliding_window_pattern=2))
    assert (long.sliding_windows, long.local_rope_layers) == ((), (True, False))
    all_global = config_from_hf(_cfg(architectures=["Gemma3ForCausalLM"], sliding_window_pattern=1))
    assert (all_global.sliding_windows, all_global.local_rope_layers) == ((), ())
    ropes = {
        "full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    }
    scaled = config_from_hf(_cfg(architectures=["Gemma3ForCausalLM"], sliding_window=6, rope_parameters=ropes))
    assert scaled.rope_theta == 1e6 and scaled.rope_scaling.rope_type == "yarn"
    assert scaled.local_rope_theta == 500.0 and scaled.local_rope_scaling.factor == 2.0
    for config in (bare, long, all_global, scaled):
        d = hf_config_dict(config, torch.float32)
        assert config_from_hf(d) == config
        hf = transformers.Gemma3TextConfig(**{k: v for k, v in d.items() if k != "model_type"})
        windows, local = _gemma3_layers_as_transformers(hf)
        assert local == (config.local_rope_layers or (False,) * config.num_hidden_layers)
        if config.sliding_windows:
            assert windows == config.sliding_windows
        else:
            assert all(w is None or w >= config.max_position_embeddings for w in windows)
        assert hf.rope_parameters["sliding_attention"]["rope_theta"] == config.local_rope_theta
        assert hf.rope_parameters["full_attention"]["rope_type"] == getattr(config.rope_scaling, "rope_type", "default")
    local_rope = hf.rope_parameters["sliding_attention"]
    assert (local_rope["rope_type"], local_rope["factor"], local_rope["rope_theta"]) == ("linear", 2.0, 500.0)


def test_sliding_windows_per_layer():
    """transformers' rules: which layers are windowed, the defaults, and that the context stays
    max_position_embeddings; a window no shorter than the context is dropped."""
    four = dict(num_hidden_layers=4, max_position_embeddings=8192)

    def windows(arch: str, **over) -> tuple[int | None, ...]:
        config = config_from_hf(_cfg(architectures=[arch], **four, **over))
        assert config.max_position_embeddings == 8192
        return config.sliding_windows

    assert windows("MistralForCausalLM", sliding_window=64) == (64,) * 4
    assert windows("MistralForCausalLM") == (4096,) * 4  # absent: transformers' 4096
    assert windows("MistralForCausalLM", sliding_window=None) == ()
    assert windows("MistralForCausalLM", sliding_window=8192) == ()  # no shorter than the context
    assert windows("Phi3ForCausalLM", sliding_window=2047) == (2047,) * 4
    assert windows("Phi3ForCausalLM") == ()  # Phi-3 has no default window
    assert windows("Gemma2ForCausalLM") == (4096, None) * 2  # the even layers
    assert windows(
        "Gemma2ForCausalLM",
        sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "attention"],
    ) == (None, 16, 16, None)
    # Qwen configs carry a window they do not use unless use_sliding_window is set.
    assert windows("Qwen2ForCausalLM", sliding_window=32) == ()
    assert windows("Qwen2ForCausalLM", sliding_window=32, use_sliding_window=True) == ()  # max_window_layers: 28
    assert windows("Qwen2ForCausalLM", sliding_window=32, use_sliding_window=True, max_window_layers=1) == (
        None,
        32,
        32,
        32,
    )
    assert windows("Qwen3ForCausalLM", use_sliding_window=True, layer_types=["sliding_attention"] * 4) == (4096,) * 4
    assert windows("Qwen3MoeForCausalLM", use_sliding_window=True, sliding_window=32, max_window_layers=2) == (32,) * 4
    assert windows("LlamaForCausalLM", sliding_window=32, use_sliding_window=True) == ()
    assert windows("GemmaForCausalLM", sliding_window=32) == ()
    assert windows("Gemma3ForCausalLM", sliding_window=16, sliding_window_pattern=2) == (16, None) * 2
    gemma2 = config_from_hf(_cfg(architectures=["Gemma2ForCausalLM"], **four, sliding_window=16))
    assert [gemma2.sliding_window(i) for i in range(4)] == [16, None, 16, None]
    assert config_from_hf(_cfg()).sliding_window(0) is None


@pytest.mark.parametrize(
    ("arch", "over"),
    [
        ("MistralForCausalLM", dict(sliding_window=6)),
        ("Phi3ForCausalLM", dict(sliding_window=6)),
        ("Gemma2ForCausalLM", dict(sliding_window=6, layer_types=["full_attention", "sliding_attention"])),
        ("Gemma2ForCausalLM", dict()),  # no window shorter than the context
        ("Gemma3ForCausalLM", dict(sliding_window=6, sliding_window_pattern=2)),
        ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
        (
            "Qwen3MoeForCausalLM",
            dict(
                use_sliding_window=True,
                sliding_window=6,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
            ),
        ),
    ],
)
def test_export_keeps_sliding_windows(arch, over):
    """config.json from a windowed ModelConfig reads back to the same windows, in pdserve and in
    transformers' config class."""
    config = config_from_hf(_cfg(architectures=[arch], **over))
    d = hf_config_dict(config, torch.float32)
    assert config_from_hf(d).sliding_windows == config.sliding_windows
    hf = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    hf_windows = [
        hf.sliding_window if t == "sliding_attention" else None
        for t in getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    ]
    if not config.sliding_windows:
        assert all(w is None or w >= config.max_position_embeddings for w in hf_windows)
    else:
        assert tuple(hf_windows) == config.sliding_windows


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "unsupported rope scaling 'dynamic'"),
        (dict(rope_scaling={"rope_type": "su"}), "supported are default, linear, llama3, yarn and longrope"),
        (dict(rope_scaling={"rope_type": "longrope", "long_factor": [1.0] * 8}), "longrope .* needs short_factor"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),  # the tanh-GELU is Gemma's only
        (dict(hidden_act="gelu_pytorch_tanh"), "unsupported hidden_act 'gelu_pytorch_tanh'"),
        (dict(architectures=["GemmaForCausalLM"], hidden_act="relu"), "unsupported hidden_act 'relu'"),
        (dict(architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.0), "partial_rotary_factor 0.0"),
        (dict(architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.2), "3 rotary dims of 16.*even"),
        (
            dict(
                architectures=["Phi3ForCausalLM"],
                original_max_position_embeddings=64,
                rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 8},
            ),
            "short_factor has 4 entries.*needs 8",
        ),
        (dict(architectures=["Gemma4ForCausalLM"]), "unsupported architecture.*Gemma4ForCausalLM"),
        (
            dict(architectures=["Gemma3ForConditionalGeneration"]),
            "'Gemma3ForConditionalGeneration': Gemma 3 with its vision tower .* text-only Gemma3ForCausalLM",
        ),
        (
            dict(architectures=["Gemma3ForCausalLM"], rope_parameters={"rope_type": "linear", "factor": 8.0}),
            "Gemma 3 rope_parameters are keyed by layer type .* unsupported keys \\['factor', 'rope_type'\\]",
        ),
        (
            dict(architectures=["Gemma3ForCausalLM"], rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            "unsupported rope scaling 'dynamic'",
        ),
        (dict(architectures=["Gemma3ForCausalLM"], use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(architectures=["Gemma3ForCausalLM"], sliding_window_pattern=0), "sliding_window_pattern 0 must be"),
        (dict(architectures=["MistralForCausalLM"], sliding_window=0), "sliding_window 0 must be at least 1"),
        (dict(architectures=["Gemma2ForCausalLM"], layer_types=["sliding_attention"]), "layer_types has 1 entries"),
        (
            dict(architectures=["Gemma2ForCausalLM"], layer_types=["chunked_attention"] * 2),
            "unsupported layer_types \\['chunked_attention'\\]",
        ),
    ],
)
def test_unsupported_configs_are_named(over, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(_cfg(**over))


def test_peft_lora_over_phi3_fused_projections(tmp_path):
    """Phi-3 has no q/k/v or gate/up modules, so PEFT adapts qkv_proj and gate_up_proj: pdserve wraps
    those fused linears (their slices, and the fused module itself) and gives PEFT's greedy tokens."""
    pytest.importorskip("peft")
    base = _hf_checkpoint(tmp_path / "base", transformers.Phi3Config, PHI3)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    peft_model = save_adapter(base, tmp_path / "a", 1, r=8, lora_alpha=16, target_modules=targets)
    lm = load_model(str(tmp_path / "base"), torch.float32, "cpu")
    manager = LoRAManager(lm.module, LoRAConfig(enable_lora=True), torch.float32, torch.device("cpu"))
    attn = lm.module.model.layers[0].self_attn
    assert [path.rpartition(".")[2] for path, _, _ in attn.qkv_proj.slices] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
    ]
    assert attn.qkv_proj.slices[-1][1:] == (0, 16 * (4 + 2 + 2))
    assert len(manager.read("a", str(tmp_path / "a")).modules) == 2 * len(targets)

    prompts = [[(7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate((9, 37))]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    lora = LoRARequest("a", 1, str(tmp_path / "a"))
    for dtype in ("float32", "bfloat16"):  # bfloat16: the adapter over the prepacked fused linears
        llm = LLM(str(tmp_path / "base"), dtype=dtype, num_kv_blocks=64, enable_lora=True)
        outs = llm.generate(prompts, sp, lora_request=[lora, lora])
        if dtype == "float32":
            for prompt, out in zip(prompts, outs, strict=True):
                with torch.no_grad():
                    ref = peft_model.generate(
                        torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False
                    )
                assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()
            plain = llm.generate(prompts, sp)
            assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in outs]
        else:
            assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
        llm.close()
