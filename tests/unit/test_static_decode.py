"""The static-shape decode path (what CUDA graphs replay), run eagerly on CPU: padded batches and
block tables give exactly the tokens of the normal path, and padding only ever writes the scratch
block. Also the CUDA-side attention kernels, checked on CPU: SDPA prefill against the blocked
prefill, and the Triton decode kernel under TRITON_INTERPRET=1 (when Triton is installed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.args import add_engine_args, engine_config_from_args
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.cuda_graphs import StaticDecoder, batch_buckets
from pdserve.model.attention import PrefillSpan, _prefill_attention, _prefill_attention_sdpa, write_kv

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def prompts(lens: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]


def make(static: bool, max_num_seqs: int = 6, max_model_len: int = 512) -> LLM:
    llm = LLM(
        "dummy:qwen3-tiny",
        dtype="float32",
        num_kv_blocks=160,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=256,
    )
    if static:
        llm.engine.enable_static_decode(use_graphs=False)
    return llm


@pytest.fixture(scope="module")
def pair():
    a, b = make(False), make(True)
    yield a, b
    a.close()
    b.close()


def count_static_steps(llm: LLM) -> list[int]:
    """Wrap the static decoder's run to record each call's batch size."""
    static = llm.engine.runner.static
    sizes: list[int] = []
    run = static.run

    def counted(reqs):
        sizes.append(len(reqs))
        return run(reqs)

    static.run = counted
    return sizes


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(64)[-3:] == [48, 56, 64]
    assert batch_buckets(200)[-4:] == [128, 160, 192, 200]


@pytest.mark.parametrize("lens", [(7,), (5, 40, 100), (17, 3, 64, 33, 90), (1, 2, 15, 16, 31, 47)])
def test_static_decode_matches_normal_path(pair, lens):
    """Batches of 1, 3, 5 and 6 sequences (padded to 1, 4, 6, 6), contexts across block edges."""
    normal, static = pair
    sizes = count_static_steps(static)
    want = [o.outputs[0].token_ids for o in normal.generate(prompts(lens), GREEDY)]
    got = [o.outputs[0].token_ids for o in static.generate(prompts(lens), GREEDY)]
    assert got == want
    assert sizes and max(sizes) == len(lens)  # decode steps did take the static path


def test_static_decode_sampling_with_seeds_and_min_tokens(pair):
    """Seeded sampling, top-k/top-p and min_tokens bans give the same tokens through either path."""
    normal, static = pair
    sps = [
        SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.7, top_p=0.8, seed=3, min_tokens=5),
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
    ]
    ps = prompts((9, 30, 50), seed=1)
    want = [o.outputs[0].token_ids for o in normal.generate(ps, sps)]
    got = [o.outputs[0].token_ids for o in static.generate(ps, sps)]
    assert got == want


def test_padding_writes_only_the_scratch_block():
    llm = make(True, max_num_seqs=8)
    try:
        eng = llm.engine
        static = eng.runner.static
        scratch = static.scratch_block
        for i, p in enumerate(prompts((20, 35, 3))):  # prefill three requests, one token each
            eng.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
            eng.step()
        reqs = list(eng.scheduler.running)
        assert len(reqs) == 3 and static.bucket(3) == 4
        before = eng.kv_cache.tensor.clone()
        with torch.inference_mode():
            static.run(reqs)
        changed = (eng.kv_cache.tensor != before).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
        live = {r.block_ids[r.num_computed_tokens // 16] for r in reqs}
        assert set(changed) <= live | {scratch}
        assert scratch in changed  # the padded row wrote its KV there
        assert all(scratch not in r.block_ids for r in reqs)
    finally:
        llm.close()


def test_reserved_block_is_never_handed_out():
    pool = BlockPool(4)
    scratch = pool.reserve()
    assert pool.num_usable == 3 and pool.num_free == 3
    got = pool.allocate(3)
    assert scratch not in got
    pool.free(got)
    pool.check_integrity()
    llm = make(True)
    try:
        stats = llm.engine.stats()
        assert stats.num_total_blocks == stats.num_free_blocks == 159
    finally:
        llm.close()


def test_static_decoder_rejects_what_it_cannot_hold(pair):
    _, static = pair
    dec: StaticDecoder = static.engine.runner.static
    assert dec.max_blocks == 32 and dec.max_batch_size == 6
    assert not dec.accepts([])
    seq = SimpleNamespace(block_ids=list(range(32)))
    assert dec.accepts([seq] * 6)
    assert not dec.accepts([seq] * 7)  # more sequences than the largest bucket
    assert not dec.accepts([SimpleNamespace(block_ids=list(range(33)))])  # wider than max_model_len


def test_enforce_eager_flag():
    import argparse

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["m", "--enforce-eager"])).enforce_eager is True
    assert engine_config_from_args(p.parse_args(["m"])).enforce_eager is False


@pytest.mark.parametrize(
    ("n", "cached", "window"),
    [
        (1, 0, None),
        (70, 0, None),
        (5, 40, None),
        (64, 17, None),
        (33, 130, None),
        (70, 0, 9),
        (5, 40, 3),
        (64, 17, 50),
        (33, 130, 40),
        (33, 130, 200),
    ],
)
def test_sdpa_prefill_matches_blocked_prefill(n, cached, window):
    """The CUDA prefill attention (SDPA, bottom-right causal after cached tokens; an explicit mask
    where a sliding window cuts in) on CPU tensors."""
    torch.manual_seed(n + cached)
    bs, kvh, h, hd, nb = 16, 2, 8, 32, 24
    kv = torch.randn(nb, 2, kvh, bs, hd)
    blocks = torch.randperm(nb)[: -(-(cached + n) // bs)]
    span = PrefillSpan(q_start=0, q_len=n, num_cached=cached, block_ids=blocks)
    q, k, v = torch.randn(n, h, hd), torch.randn(n, kvh, hd), torch.randn(n, kvh, hd)
    slots = torch.tensor([int(blocks[p // bs]) * bs + p % bs for p in range(cached, cached + n)])
    from pdserve.model.attention import AttentionMetadata

    meta = AttentionMetadata(bs, slots, 0, torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    write_kv(kv, k, v, meta)
    ref = _prefill_attention(q, k, v, kv, span, hd**-0.5, window=window)
    got = _prefill_attention_sdpa(q, k, v, kv, span, hd**-0.5, window)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


_TRITON_CHECK = textwrap.dedent(
    """
    import torch
    import triton.runtime.interpreter as interp

    # Triton 3.x's interpreter turns loop bounds into ints with int(1-element array), which
    # numpy >= 2 refuses; index the element instead.
    _orig = interp._patch_lang_tensor

    def _patched(tensor, scope):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patched

    from pdserve.model import triton_decode
    from pdserve.model.attention import AttentionMetadata, _decode_attention_torch

    torch.manual_seed(0)


    def scale(hd):
        return hd**-0.5


    def check(q, kv, tables, ctx, ref_kv, ref_tables, tol, what, window=None):
        # The kernel on (kv, tables) against the torch path on (ref_kv, ref_tables), in fp32.
        hd, bs = q.shape[-1], kv.shape[3]
        meta = AttentionMetadata(bs, torch.zeros(0, dtype=torch.long), q.shape[0], ref_tables, ctx)
        ref = _decode_attention_torch(q.float(), ref_kv.float(), meta, scale(hd), window=window)
        got = triton_decode.paged_decode_attention(q, kv, tables, ctx, scale(hd), window)
        err = (got.float() - ref).abs().max().item()
        assert err < tol, (what, window, err)


    # (dtype, block size, kv heads, group, head dim, context lengths, table width, tolerance).
    # bf16 is left out: the interpreter's tl.dot mis-handles it (checked on GPU instead).
    cases = [
        (torch.float32, 16, 2, 2, 16, [1, 17, 300, 64], 24, 1e-5),
        (torch.float16, 16, 2, 4, 32, [5, 129, 1000], 70, 4e-3),
        (torch.float32, 8, 1, 1, 16, [3, 16, 9], 2, 1e-5),
        (torch.float32, 16, 2, 4, 16, [1, 2000, 16], 640, 1e-5),  # 40 partitions of 256 keys
        (torch.float16, 16, 8, 4, 128, [1, 16, 17, 300], 20, 4e-3),  # Qwen3-8B's heads
        (torch.float32, 16, 2, 3, 16, [7, 33, 48], 4, 1e-5),  # a group that is no power of two
    ]
    for dtype, bs, kvh, group, hd, lens, width, tol in cases:
        nb = 700
        kv = torch.randn(nb, 2, kvh, bs, hd).to(dtype)
        d = len(lens)
        tables = torch.randint(0, nb, (d, width))
        q = torch.randn(d, kvh * group, hd).to(dtype)
        ctx = torch.tensor(lens)
        check(q, kv, tables, ctx, kv, tables, tol, (dtype, lens))
        # Columns past a row's context are never read (the CUDA-graph tables keep stale ids
        # there): ids far out of range in them change nothing.
        past = torch.arange(width)[None, :] >= -(-ctx[:, None] // bs)
        check(q, kv, tables.masked_fill(past, 1 << 40), ctx, kv, tables, tol, ("stale", dtype, lens))

    # Sliding windows: 1 key; inside one step of 64 keys; across steps and partitions (of 128 keys
    # here: partitions wholly before the window read nothing); longer than every context. Columns
    # before a row's window are never read either.
    dtype, bs, kvh, group, hd, lens, width = torch.float32, 16, 2, 3, 16, [1, 5, 64, 65, 130, 300, 700], 48
    kv = torch.randn(700, 2, kvh, bs, hd)
    tables = torch.randint(0, 700, (len(lens), width))
    q = torch.randn(len(lens), kvh * group, hd)
    ctx = torch.tensor(lens)
    for window in (1, 7, 64, 100, 257, 1000):
        check(q, kv, tables, ctx, kv, tables, 1e-5, "window", window)
        before = torch.arange(width)[None, :] < (ctx[:, None] - window).clamp(min=0) // bs
        check(q, kv, tables.masked_fill(before, 1 << 40), ctx, kv, tables, 1e-5, "skipped blocks", window)

    # Block ids whose element offset is past 2**31 (a layer of an 8B model's cache on a big GPU):
    # offsets must be int64. The cache is virtual memory: only the blocks used are touched.
    bs, kvh, group, hd = 16, 1, 2, 16
    nb = (1 << 31) // (2 * kvh * bs * hd) + 64
    try:
        big = torch.empty(nb, 2, kvh, bs, hd, dtype=torch.float16)
    except RuntimeError:  # no room even for the address space: nothing to check
        big = None
    if big is not None:
        small = torch.randn(6, 2, kvh, bs, hd).half()
        ids = torch.arange(nb - 6, nb)
        big[ids] = small
        q = torch.randn(2, kvh * group, hd).half()
        ctx = torch.tensor([40, 5])
        check(q, big, ids.view(2, 3), ctx, small, torch.arange(6).view(2, 3), 4e-3, "block ids past 2**31 elements")

    # A float8 cache (--kv-cache-dtype): loaded as float8, converted in the kernel, its scales folded
    # in; against the torch path over the dequantized values.
    from pdserve.model.kv_quant import KVScales, quantize

    scales = KVScales(0.37, 1.9)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
            bs, kvh, group, hd, lens, width = 16, 2, 2, 32, [1, 17, 300], 24
            kv = torch.randn(100, 2, kvh, bs, hd) * 3
            kv8 = torch.stack([quantize(kv[:, 0], fp8, scales.k), quantize(kv[:, 1], fp8, scales.v)], 1)
            deq = torch.stack([kv8[:, 0].float() * scales.k, kv8[:, 1].float() * scales.v], 1)
            tables, ctx = torch.randint(0, 100, (3, width)), torch.tensor(lens)
            q = torch.randn(3, kvh * group, hd).to(dtype)
            for window in (None, 7, 100):
                meta = AttentionMetadata(bs, torch.zeros(0, dtype=torch.long), 3, tables, ctx)
                ref = _decode_attention_torch(q.float(), deq, meta, scale(hd), window=window)
                got = triton_decode.paged_decode_attention(q, kv8, tables, ctx, scale(hd), window, scales)
                err = (got.float() - ref).abs().max().item()
                assert err < tol, ("float8", fp8, dtype, window, err)
    print("ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
def test_triton_decode_kernel_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
