"""GPU-only: --kv-cache-dtype fp8 on CUDA. The Triton decode kernel over a float8 cache (loaded as
float8, converted in the kernel, scales folded in) and the SDPA prefill over float8 cached blocks,
against the torch reference over the dequantized values, at Qwen3-8B's heads; CUDA-graph steps
over a float8 cache give the tokens of eager ones.

Skipped without a CUDA device (CI is CPU-only). The kernel's logic is also checked on CPU under
TRITON_INTERPRET=1 (tests/unit/test_static_decode.py).
"""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model import triton_decode
from pdserve.model.attention import (
    AttentionMetadata,
    PrefillSpan,
    _decode_attention_torch,
    _prefill_attention,
    _prefill_attention_sdpa,
    write_kv,
)
from pdserve.model.kv_quant import KVScales, quantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SCALES = KVScales(0.37, 1.9)


def _quantized(kv: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A float8 cache of kv ([nb, 2, ...]) and its dequantized values in float32."""
    kv8 = torch.stack([quantize(kv[:, 0], fp8, SCALES.k), quantize(kv[:, 1], fp8, SCALES.v)], 1)
    return kv8, torch.stack([kv8[:, 0].float() * SCALES.k, kv8[:, 1].float() * SCALES.v], 1)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 4096])
def test_triton_decode_kernel_reads_float8(fp8, dtype, window):
    torch.manual_seed(0)
    bs, kvh, group, hd, nb, width = 16, 8, 4, 128, 4096, 2560
    kv8, deq = _quantized(torch.randn(nb, 2, kvh, bs, hd, device="cuda") * 3, fp8)
    lens = torch.tensor([1, 15, 16, 17, 2000, width * bs], device="cuda")
    d = lens.numel()
    tables = torch.randint(0, nb, (d, width), device="cuda")
    q = torch.randn(d, kvh * group, hd, device="cuda").to(dtype)
    meta = AttentionMetadata(bs, torch.zeros(0, dtype=torch.long, device="cuda"), d, tables, lens)
    assert triton_decode.supported(q, kv8)
    ref = _decode_attention_torch(q.float(), deq, meta, hd**-0.5, window=window)
    got = triton_decode.paged_decode_attention(q, kv8, tables, lens, hd**-0.5, window, SCALES)
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    # The torch path on CUDA (the gather's own conversion) agrees too, within what its softmax and
    # matmuls in q's dtype over up to 41k keys allow (measured on an H200: 0.085 bf16, 0.010 fp16).
    torch_path = _decode_attention_torch(q, kv8, meta, hd**-0.5, window=window, scales=SCALES)
    loose = {torch.bfloat16: 1.5e-1, torch.float16: 2.5e-2}[dtype]
    torch.testing.assert_close(torch_path.float(), ref, atol=loose, rtol=loose)


@pytest.mark.parametrize(("n", "cached", "window"), [(100, 300, None), (100, 300, 64)])
def test_sdpa_prefill_over_float8_cached_blocks(n, cached, window):
    torch.manual_seed(1)
    bs, kvh, h, hd, nb = 16, 8, 32, 128, 200
    kv8 = torch.zeros(nb, 2, kvh, bs, hd, device="cuda", dtype=torch.float8_e4m3fn)
    deq = torch.zeros(nb, 2, kvh, bs, hd, device="cuda")
    blocks = torch.randperm(nb, device="cuda")[: -(-(cached + n) // bs)]
    q, k, v = (torch.randn(n + cached, x, hd, device="cuda").bfloat16() for x in (h, kvh, kvh))
    pos = torch.arange(cached + n, device="cuda")
    empty = torch.zeros(0, dtype=torch.long, device="cuda")
    meta = AttentionMetadata(bs, blocks[pos // bs] * bs + pos % bs, 0, empty.view(0, 0), empty)
    write_kv(kv8, k, v, meta, SCALES)
    deq_view = deq.view(-1, hd)
    k_idx, v_idx = meta.kv_write_indices(kvh)
    deq_view[k_idx] = (quantize(k.reshape(-1, hd), torch.float8_e4m3fn, SCALES.k).float() * SCALES.k)
    deq_view[v_idx] = (quantize(v.reshape(-1, hd), torch.float8_e4m3fn, SCALES.v).float() * SCALES.v)
    span = PrefillSpan(0, n, cached, blocks)
    qs, ks, vs = q[cached:], k[cached:], v[cached:]
    ref = _prefill_attention(qs.float(), ks.float(), vs.float(), deq, span, hd**-0.5, window=window)
    got = _prefill_attention_sdpa(qs, ks, vs, kv8, span, hd**-0.5, window, SCALES)
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


def test_graph_decode_over_float8_cache_equals_eager():
    kw = dict(device="cuda", dtype="bfloat16", kv_cache_dtype="fp8", num_kv_blocks=512, max_num_seqs=16,
              max_model_len=2048)
    graph, eager = LLM("dummy:qwen3-tiny", **kw), LLM("dummy:qwen3-tiny", enforce_eager=True, **kw)
    try:
        assert graph.engine.kv_cache.tensor.dtype == torch.float8_e4m3fn and graph.engine.runner.static is not None
        g = torch.Generator().manual_seed(0)
        ps = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 40, 100, 300)]
        sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        a = [o.outputs[0].token_ids for o in graph.generate(ps, sp)]
        b = [o.outputs[0].token_ids for o in eager.generate(ps, sp)]
        assert a == b
    finally:
        graph.close()
        eager.close()
