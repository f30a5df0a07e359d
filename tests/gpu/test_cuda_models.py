"""GPU-only: the other model families, LoRA and FP8 checkpoints on CUDA match CPU.

On CUDA the engine fuses q/k/v (with Qwen2's biases) and gate/up into one linear each and replays
decode-only steps from CUDA graphs; LoRA rows take the eager path and their deltas cover every
slice of the fused linears. CPU in float32 runs none of that: equal greedy tokens check it.
Skipped without a CUDA device; run by benchmarks/gpu_check.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pdserve import LLM, LoRARequest, SamplingParams
from pdserve.model.export import save_hf_dir
from pdserve.model.loader import load_model
from pdserve.model.lora_dummy import save_random_adapter
from pdserve.model.presets import get_preset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[(3 * i + j) % 250 for j in range(n)] for i, n in enumerate((5, 40, 100, 17))]
SP = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _with_random_biases(preset: str, out: Path, **config_changes) -> str:
    """The preset as an HF directory, its biases and norms made nonzero / not one (dummy weights
    have zero biases: a lost bias would go unseen)."""
    lm = load_model(f"dummy:{preset}", torch.float32, "cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lm.module.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    config = dataclasses.replace(lm.config, **config_changes)
    return str(save_hf_dir(out, config, lm.module.state_dict(), lm.tokenizer))


# qwen2-tiny with a 24-token window on layer 1: prompts and decodes past it take the Triton kernel's
# window, SDPA's explicit mask and the CUDA graphs with the window in them. gemma3-tiny: the same
# with its 16-token windows, two RoPE tables and (1 + w) q/k norms.
@pytest.mark.parametrize(
    ("preset", "changes"),
    [
        ("llama-tiny", {}),
        ("qwen2-tiny", {}),
        ("qwen2-tiny", dict(sliding_windows=(None, 24))),
        ("gemma3-tiny", {}),
    ],
    ids=["llama-tiny", "qwen2-tiny", "qwen2-tiny-window", "gemma3-tiny"],
)
def test_cuda_families_match_cpu(preset, changes, tmp_path):
    model = _with_random_biases(preset, tmp_path / preset, **changes)
    cpu = LLM(model, dtype="float32", num_kv_blocks=64)
    gpu = LLM(model, device="cuda", dtype="float32", num_kv_blocks=64)
    assert [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, SP)] == [
        o.outputs[0].token_ids for o in gpu.generate(PROMPTS, SP)
    ]


def test_cuda_lora_mixed_batch_matches_cpu(tmp_path):
    config = get_preset("qwen3-tiny")
    loras = [
        LoRARequest(n, i + 1, str(save_random_adapter(tmp_path / n, config, 8, seed=i, std=0.1)))
        for i, n in enumerate("ab")
    ]
    which = [None, loras[0], loras[1], loras[0]]
    outs = []
    for device in ("cpu", "cuda"):
        llm = LLM("dummy:qwen3-tiny", device=device, dtype="float32", num_kv_blocks=64, enable_lora=True)
        outs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP, lora_request=which)])
        # Then a decode-only batch without adapters: the graph path again.
        outs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], SP)])
    assert outs[0] == outs[2] and outs[1] == outs[3]
    assert outs[0][1] != outs[1][1]  # prompt 1 with adapter a differs from prompt 1 without


@pytest.mark.parametrize("quantization", ["fp8", "fp8-dynamic"])
def test_cuda_fp8_checkpoint_matches_cpu(quantization, tmp_path):
    """An FP8 checkpoint (block-wise, and compressed-tensors per-channel) dequantized on the GPU as
    on the CPU: the same greedy tokens."""
    from pdserve.model.export import export_model

    model = str(export_model("dummy:qwen3-moe-tiny", tmp_path / "fp8", "float32", quantization=quantization,
                             weight_block_size=(16, 32)))
    cpu = LLM(model, dtype="float32", num_kv_blocks=64)
    gpu = LLM(model, device="cuda", dtype="float32", num_kv_blocks=64)
    assert [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, SP)] == [
        o.outputs[0].token_ids for o in gpu.generate(PROMPTS, SP)
    ]


def test_cuda_speculative_decoding_matches_cpu():
    """N-gram speculative rows on CUDA (SDPA over the row's cached context, the seeded generator
    rewound on the device, CUDA graphs kept for the plain decode steps between): CPU's greedy tokens,
    and on CUDA the greedy and seeded tokens of plain decoding; drafts were accepted."""
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    passage = [(7 * j) % 250 for j in range(24)]
    prompts = [passage * 3, PROMPTS[1], passage[:5] * 6, PROMPTS[3]]
    sps = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
           SamplingParams(max_tokens=40, temperature=0.8, seed=11, ignore_eos=True)]

    def run(device: str, **kw) -> list[list[list[int]]]:
        llm = LLM("dummy:qwen3-tiny", device=device, dtype="float32", num_kv_blocks=96, **kw)
        out = [[o.outputs[0].token_ids for o in llm.generate(prompts, sp)] for sp in sps]
        if kw:
            stats = llm.spec_decode_stats()
            assert stats is not None and stats.num_accepted_tokens > 0
        return out

    cpu, cuda = run("cpu", speculative_config=spec), run("cuda", speculative_config=spec)
    assert cuda[0] == cpu[0]
    assert run("cuda") == cuda


def test_cuda_gemma2_softcap_and_windows_match_cpu(tmp_path):
    """Gemma 2 on CUDA: soft-capped attention takes the torch code (not the Triton kernel or SDPA),
    windowed on alternate layers, with the final-logit cap; CPU's greedy tokens."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=24, attn_logit_softcapping=2.0, final_logit_softcapping=1.5, initializer_range=0.2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "gemma2")
    from pdserve.model.tokenizer import Tokenizer

    Tokenizer.byte_level(320, 256).save(tmp_path / "gemma2")
    model = str(tmp_path / "gemma2")
    cpu = LLM(model, dtype="float32", num_kv_blocks=64)
    gpu = LLM(model, device="cuda", dtype="float32", num_kv_blocks=64)
    assert [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, SP)] == [
        o.outputs[0].token_ids for o in gpu.generate(PROMPTS, SP)
    ]


@pytest.mark.parametrize("pooling_type", ["last", "mean"])
def test_cuda_embeddings_match_cpu(pooling_type):
    """`LLM.embed` on CUDA: CPU's vectors (float32), a batch of prompts of several lengths."""
    vecs = []
    for device in ("cpu", "cuda"):
        llm = LLM("dummy:qwen3-tiny", device=device, dtype="float32", num_kv_blocks=64, pooling_type=pooling_type)
        vecs.append(torch.tensor([o.embedding for o in llm.embed(PROMPTS)]))
    torch.testing.assert_close(vecs[1], vecs[0], atol=1e-4, rtol=1e-4)
