"""GPU-only: GPTQ / AWQ checkpoints on CUDA are dequantized at load (no int4 GPU kernel) and give
the CPU's greedy tokens in float32 (where the CPU runs the float32 int4 kernel: the same weights to
float32 rounding). Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdserve import LLM, SamplingParams
from pdserve.model.export import export_model
from pdserve.model.int4_linear import Int4Linear
from pdserve.model.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[(3 * i + j) % 250 for j in range(n)] for i, n in enumerate((5, 40, 100))]
SP = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_checkpoint_on_cuda_matches_cpu(tmp_path, method):
    out = str(export_model("dummy:llama-tiny", tmp_path / method, quantization=method, group_size=32))
    lm = load_model(out, torch.float32, "cuda")
    assert not any(isinstance(m, Int4Linear) for m in lm.module.modules())
    assert isinstance(lm.module.model.layers[0].self_attn.q_proj, nn.Linear)
    cpu = LLM(model=out, device="cpu", dtype="float32")
    ref = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, SP)]
    gpu = LLM(model=out, device="cuda", dtype="float32")
    got = [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, SP)]
    assert got == ref
