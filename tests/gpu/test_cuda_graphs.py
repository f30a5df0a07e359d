"""GPU-only: CUDA-graph decode steps give the tokens of eager steps; the Triton decode kernel and
the SDPA prefill match the torch reference in bf16 at Qwen3 shapes.

Skipped without a CUDA device (CI is CPU-only); run by benchmarks/gpu_check.py on a GPU machine.
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

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def prompts(lens, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]


def tokens(llm: LLM, ps, sp=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(ps, sp)]


@pytest.fixture(scope="module")
def graph_and_eager():
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=512, max_num_seqs=16, max_model_len=2048)
    graph, eager = LLM("dummy:qwen3-tiny", **kw), LLM("dummy:qwen3-tiny", enforce_eager=True, **kw)
    yield graph, eager
    graph.close()
    eager.close()


def test_graphs_are_captured(graph_and_eager):
    graph, eager = graph_and_eager
    static = graph.engine.runner.static
    assert static is not None and eager.engine.runner.static is None
    assert sorted(static._graphs) == static.buckets == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("lens", [(9,), (5, 40, 100), (3, 17, 64, 33, 90, 200, 1, 16, 15)])
def test_graph_decode_equals_eager(graph_and_eager, lens):
    graph, eager = graph_and_eager
    replays = []
    static = graph.engine.runner.static
    run = static.run
    static.run = lambda reqs: replays.append(len(reqs)) or run(reqs)
    try:
        assert tokens(graph, prompts(lens)) == tokens(eager, prompts(lens))
    finally:
        static.run = run
    assert replays and max(replays) == len(lens)


def test_graph_decode_sampling_with_seeds(graph_and_eager):
    graph, eager = graph_and_eager
    sps = [
        SamplingParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=s, ignore_eos=True) for s in range(4)
    ]
    ps = prompts((7, 30, 61, 12), seed=2)
    assert tokens(graph, ps, sps) == tokens(eager, ps, sps)


def test_bf16_graphs_run_and_mostly_agree():
    """bf16: graph and eager steps pad GEMMs differently, so near-ties may flip; most agree."""
    kw = dict(device="cuda", dtype="bfloat16", num_kv_blocks=512, max_num_seqs=8, max_model_len=1024)
    a, b = LLM("dummy:qwen3-tiny", **kw), LLM("dummy:qwen3-tiny", enforce_eager=True, **kw)
    try:
        ps = prompts((5, 40, 100, 300, 7, 64))
        x, y = tokens(a, ps), tokens(b, ps)
        assert all(len(t) == GREEDY.max_tokens for t in x)
        assert sum(s == t for s, t in zip(x, y, strict=True)) >= len(ps) // 2
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("kvh", "group", "width", "window"),
    [(8, 4, 128, None), (2, 2, 2560, None), (1, 16, 8, None), (8, 4, 128, 100), (2, 2, 2560, 4096)],
)
def test_triton_decode_kernel_matches_torch(dtype, kvh, group, width, window):
    """Qwen3-8B's heads (8 KV x 4), a table as wide as a 40960-token max_model_len, a wide group;
    sliding windows (Mistral's 4096)."""
    torch.manual_seed(0)
    bs, hd, nb = 16, 128, 4096
    kv = torch.randn(nb, 2, kvh, bs, hd, device="cuda").to(dtype)
    lens = torch.tensor([1, 15, 16, 17, 2000, width * bs], device="cuda").clamp(max=width * bs)
    d = lens.numel()
    tables = torch.randint(0, nb, (d, width), device="cuda")
    q = torch.randn(d, kvh * group, hd, device="cuda").to(dtype)
    meta = AttentionMetadata(bs, torch.zeros(0, dtype=torch.long, device="cuda"), d, tables, lens)
    ref = _decode_attention_torch(q.float(), kv.float(), meta, hd**-0.5, window=window)
    got = triton_decode.paged_decode_attention(q, kv, tables, lens, hd**-0.5, window)
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize(("n", "cached", "window"), [(2000, 0, None), (100, 300, None), (2000, 0, 512), (100, 300, 64)])
def test_sdpa_prefill_bf16(n, cached, window):
    """The CUDA prefill (SDPA) against the blocked torch prefill in fp32, at Qwen3-8B's heads; with
    a sliding window, SDPA's explicit-mask path."""
    torch.manual_seed(1)
    bs, kvh, h, hd, nb = 16, 8, 32, 128, 200
    kv = torch.randn(nb, 2, kvh, bs, hd, device="cuda").bfloat16()
    blocks = torch.randperm(nb, device="cuda")[: -(-(cached + n) // bs)]
    q, k, v = (torch.randn(n, x, hd, device="cuda").bfloat16() for x in (h, kvh, kvh))
    pos = torch.arange(cached, cached + n, device="cuda")
    empty = torch.zeros(0, dtype=torch.long, device="cuda")
    write_kv(kv, k, v, AttentionMetadata(bs, blocks[pos // bs] * bs + pos % bs, 0, empty.view(0, 0), empty))
    span = PrefillSpan(0, n, cached, blocks)
    ref = _prefill_attention(q.float(), k.float(), v.float(), kv.float(), span, hd**-0.5, window=window)
    got = _prefill_attention_sdpa(q, k, v, kv, span, hd**-0.5, window)
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


def test_triton_decode_kernel_block_ids_past_int32_offsets():
    """A layer of more than 2**31 elements (an 8B model's cache on an H200): the blocks at its end."""
    torch.manual_seed(2)
    bs, kvh, group, hd = 16, 8, 4, 128
    nb = (1 << 31) // (2 * kvh * bs * hd) + 8
    big = torch.empty(nb, 2, kvh, bs, hd, device="cuda", dtype=torch.bfloat16)  # 4.3 GB, left uninitialised
    small = torch.randn(8, 2, kvh, bs, hd, device="cuda").bfloat16()
    ids = torch.arange(nb - 8, nb, device="cuda")
    big[ids] = small
    lens = torch.tensor([64, 37], device="cuda")
    q = torch.randn(2, kvh * group, hd, device="cuda").bfloat16()
    meta = AttentionMetadata(bs, lens[:0], 2, torch.arange(8, device="cuda").view(2, 4), lens)
    ref = _decode_attention_torch(q.float(), small.float(), meta, hd**-0.5)
    got = triton_decode.paged_decode_attention(q, big, ids.view(2, 4), lens, hd**-0.5)
    del big
    torch.cuda.empty_cache()
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


def test_graph_replay_pads_into_the_scratch_block_only():
    """A replayed 3-sequence step (bucket 4) writes its rows' new KV and the scratch block, nothing else."""
    llm = LLM("dummy:qwen3-tiny", device="cuda", dtype="float32", num_kv_blocks=128, max_num_seqs=8, max_model_len=1024)
    try:
        eng = llm.engine
        static = eng.runner.static
        assert static is not None and static.bucket(3) == 4 and 4 in static._graphs
        for i, p in enumerate(prompts((20, 35, 3))):
            eng.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
            eng.step()
        reqs = list(eng.scheduler.running)
        assert len(reqs) == 3
        eng.kv_cache.tensor[:, static.scratch_block] = 0  # the warm-up and capture wrote padding KV there
        before = eng.kv_cache.tensor.clone()
        with torch.inference_mode():
            logits = static.run(reqs)
            torch.cuda.synchronize()
        assert logits.shape[0] == 3 and bool(torch.isfinite(logits).all())
        changed = (eng.kv_cache.tensor != before).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
        live = {r.block_ids[r.num_computed_tokens // 16] for r in reqs}
        assert set(changed) <= live | {static.scratch_block}
        assert static.scratch_block in changed and live <= set(changed)
    finally:
        llm.close()
