import pytest
import torch
from torch import nn

from pdserve.model.cpu_linear import PackedLinear, can_prepack, prepack_linears_

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.device("cpu"), torch.bfloat16), reason="oneDNN bf16 unavailable"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 5, 16, 100])
def test_packed_linear_matches_the_linear(m, bias):
    torch.manual_seed(0)
    lin = nn.Linear(256, 384, bias=bias).to(torch.bfloat16)
    if bias:
        nn.init.normal_(lin.bias)
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    packed = PackedLinear(lin.weight, lin.bias)(x)
    if bias:  # the bias is added inside the GEMM, in float32 before the one rounding to bf16
        torch.testing.assert_close(packed, lin(x), atol=0.02, rtol=0.01)
    else:
        assert torch.equal(packed, lin(x))


def test_prepack_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Sequential(nn.Linear(8, 8, bias=False)), nn.Linear(8, 8))
    model = model.to(torch.bfloat16)
    assert prepack_linears_(model) == 3
    assert all(isinstance(m, PackedLinear) for m in (model[0], model[1][0], model[2]))
    assert model[2].bias is not None


@pytest.mark.parametrize("model", ["dummy:qwen3-tiny", "dummy:qwen3-moe-tiny", "dummy:qwen2-tiny"])
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
