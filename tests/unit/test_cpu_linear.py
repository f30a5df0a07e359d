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
