"""The fused Triton kernels compiled for CUDA against the torch ops they replace (the same checks
as tests/unit/test_triton_fused.py's interpreter run, with bfloat16 sums exact as on a GPU), and
the CUDA engine's float32 greedy tokens with and without them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.unit.test_triton_fused import _CHECK

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_fused_kernels_on_cuda():
    r = subprocess.run([sys.executable, "-c", _CHECK, "cuda"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
