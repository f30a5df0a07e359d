import pytest
import torch
from torch import nn

from pdserve.model.cpu_linear import PackedLinear, can_prepack, prepack_linears_

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.device("cpu"), torch.bfloat16), reason="oneDNN bf16 unavailable"
)


@pytest.mark.parametrize("m", [1, 5, 16, 100])
def test_packed_linear_is_bit_identical(m):
    torch.manual_seed(0)
    lin = nn.Linear(256, 384, bias=False).to(torch.bfloat16)
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(lin.weight)(x), lin(x))


def test_prepack_replaces_bias_free_linears_only():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Sequential(nn.Linear(8, 8, bias=False)), nn.Linear(8, 8))
    model = model.to(torch.bfloat16)
    assert prepack_linears_(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert isinstance(model[2], nn.Linear)


@pytest.mark.parametrize("model", ["dummy:qwen3-tiny", "dummy:qwen3-moe-tiny"])
def test_fused_packed_model_matches_the_plain_one(model):
    """q/k/v and gate/up fused into one packed GEMM each: same greedy tokens as the plain model."""
    from pdserve import LLM, SamplingParams
    from pdserve.engine import engine as engine_mod

    prompts = [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate((5, 40, 90))]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fused = LLM(model, dtype="bfloat16", num_kv_blocks=64)
    assert fused.engine.loaded.module.model.layers[0].self_attn.qkv_proj is not None
    a = [o.outputs[0].token_ids for o in fused.generate(prompts, sp)]
    orig = engine_mod.can_prepack
    engine_mod.can_prepack = lambda *_: False
    try:
        plain = LLM(model, dtype="bfloat16", num_kv_blocks=64)
    finally:
        engine_mod.can_prepack = orig
    b = [o.outputs[0].token_ids for o in plain.generate(prompts, sp)]
    assert a == b
