"""--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2: the paged cache stores float8 with per-layer scales.

Exact checks where the arithmetic is exact: float8 -> compute-dtype conversion for every byte, and
every attention path (decode, prefill over cached blocks, SDPA, multi-query rows, windows) over a
float8 cache against the same path over a compute-dtype cache holding the dequantized values.
Model-level checks with fp8's precision: an e4m3 value is within 2**-4 (relative) of what it
stores; through two layers of attention the logits stay within 2**-3 of the largest logit
(measured: about 2% for qwen3-tiny, 5% for gemma3-tiny), and greedy tokens differ only where the
bf16 logits of the two candidates were that close (random dummy weights give nearly flat logits,
so such near-ties happen).
"""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from pdserve import LLM, SamplingParams
from pdserve.config import CacheConfig, EngineConfig
from pdserve.engine.args import add_engine_args, engine_config_from_args
from pdserve.engine.engine import LLMEngine
from pdserve.kv.handshake import kv_format_mismatch
from pdserve.kv.messages import KVLayoutInfo
from pdserve.launch import instance_argv, plan_instances
from pdserve.launch_command import add_parser as add_up_parser
from pdserve.launch_command import spec_from_args
from pdserve.model.attention import _prefill_attention_sdpa, paged_attention
from pdserve.model.export import export_model
from pdserve.model.kv_quant import KVScales, gather_dequantized, quantize
from tests.unit.paged import BS
from tests.unit.test_attention import MQ_LENGTHS, MQ_STEPS, STEPS, _multi_query_step_meta, _step_meta

TINY = "dummy:qwen3-tiny"
FP8S = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
LOGIT_TOL = 2.0**-3  # of the largest |logit| (module doc)


def prompts(lens: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]


# ---- the cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FP8S))
def test_cache_stores_float8_and_holds_twice_the_blocks(name):
    cache = CacheConfig(kv_cache_gib=0.01)
    ref = LLMEngine(EngineConfig(model=TINY, cache=cache))
    eng = LLMEngine(EngineConfig(model=TINY, cache=CacheConfig(kv_cache_gib=0.01, cache_dtype=name)))
    try:
        assert ref.kv_cache.tensor.dtype == torch.bfloat16
        assert eng.kv_cache.tensor.dtype == eng.layout.dtype == FP8S[name]
        assert eng.layout.block_bytes * 2 == ref.layout.block_bytes
        assert abs(eng.layout.num_blocks - 2 * ref.layout.num_blocks) <= 1
        assert eng.layout.scales == (KVScales(),) * 2  # the dummy model has no checkpoint scales
        eng.add_request("r", prompts((40,))[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        eng.run_until_done()
        written = eng.kv_cache.tensor.view(torch.uint8).count_nonzero().item()
        assert written > 0 and eng.kv_cache.tensor.float().isfinite().all()
    finally:
        ref.close()
        eng.close()


def test_unknown_kv_cache_dtype_is_refused(capsys):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(cache_dtype="int8")  # type: ignore[arg-type]
    p = argparse.ArgumentParser()
    add_engine_args(p)
    with pytest.raises(SystemExit):
        p.parse_args([TINY, "--kv-cache-dtype", "int8"])
    assert "--kv-cache-dtype" in capsys.readouterr().err
    assert engine_config_from_args(p.parse_args([TINY, "--kv-cache-dtype", "fp8"])).cache.cache_dtype == "fp8"


def test_up_passes_the_flag_to_every_instance(capsys):
    up = argparse.ArgumentParser()
    add_up_parser(up.add_subparsers())
    spec = spec_from_args(up.parse_args(["up", "disagg", TINY, "--cpu-map", "0;1", "--kv-cache-dtype", "fp8"]))
    serve = argparse.ArgumentParser()
    add_engine_args(serve)
    for plan in plan_instances(spec, (0, 1)):
        argv = instance_argv(spec, plan, 8100, "127.0.0.1:5555")
        i = argv.index("--kv-cache-dtype")
        assert engine_config_from_args(serve.parse_args([TINY, *argv[i : i + 2]])).cache.cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        up.parse_args(["up", "disagg", TINY, "--kv-cache-dtype", "fp4"])
    assert "--kv-cache-dtype" in capsys.readouterr().err


def test_handshake_refuses_another_kv_format():
    """The check both handshake sides run before the fingerprint: dtype, then a float8 cache's scales."""
    ours = KVLayoutInfo(2, 64, 16, 2, 16, "float8_e4m3fn", 1024, 65536, [1.0, 1.0, 0.5, 2.0])
    assert kv_format_mismatch(ours, "float8_e4m3fn", [1.0, 1.0, 0.5, 2.0]) is None
    assert kv_format_mismatch(ours, "", []) is None  # a peer that does not say: the fingerprint decides
    assert "--kv-cache-dtype" in kv_format_mismatch(ours, "bfloat16", [])
    assert "k_scale / v_scale" in kv_format_mismatch(ours, "float8_e4m3fn", [1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_float8_value_dequantizes_exactly(fp8, dtype):
    """All 256 bytes (NaN excepted) through the gather's conversion = torch's cast times the scale."""
    raw = torch.arange(256, dtype=torch.uint8)
    raw = raw[raw.view(fp8).float().isfinite()]  # NaN and e5m2's infinities are never stored (clamped)
    n = raw.numel() - raw.numel() % 8
    layer = torch.stack([raw[:n], raw[:n].flip(0)]).view(fp8).view(1, 2, 1, n // 8, 8)  # [nb, 2, kvh, bs, hd]
    scales = KVScales(0.3, 1.7)
    got = gather_dequantized(layer, torch.tensor([0]), dtype, scales)  # [2, kvh, bs, hd]
    ref = layer[0].to(dtype)
    ref[0].mul_(scales.k)
    ref[1].mul_(scales.v)
    assert got.dtype == dtype and torch.equal(got, ref.view(got.shape))


# ---- every attention path over a float8 cache ----------------------------------------------------
KVH, GROUP, HD = 2, 3, 16
SCALE = HD**-0.5


def _round_trip(x: torch.Tensor, fp8: torch.dtype, scale: float) -> torch.Tensor:
    return (quantize(x, fp8, scale).float() * scale).to(x.dtype)


def _run_steps(steps, lengths, meta_of, fp8, dtype, window, softcap, seed):
    """The steps over a float8 cache and over a `dtype` cache fed the round-tripped K/V; both get
    the round-tripped K/V (so a chunk with nothing cached, which attends to its K/V as given, sees
    the same values); each step's outputs must be equal, and the SDPA prefill of each chunk too."""
    g = torch.Generator().manual_seed(seed)
    scales = KVScales(0.37, 1.9)
    qkv = {
        seq: (
            torch.randn(n, KVH * GROUP, HD, generator=g).to(dtype),
            _round_trip(torch.randn(n, KVH, HD, generator=g).to(dtype) * 3, fp8, scales.k),
            _round_trip(torch.randn(n, KVH, HD, generator=g).to(dtype) * 3, fp8, scales.v),
        )
        for seq, n in lengths.items()
    }
    order = torch.randperm(16, generator=g).tolist()
    blocks: dict[str, list[int]] = {}
    for seq, n in lengths.items():
        used = sum(map(len, blocks.values()))
        blocks[seq] = order[used : used + -(-n // BS)]
    cache8 = torch.zeros(16, 2, KVH, BS, HD, dtype=fp8)
    ref_cache = torch.zeros(16, 2, KVH, BS, HD, dtype=dtype)
    for step in steps:
        meta, rows = meta_of(step, blocks)
        q, k, v = (torch.cat([qkv[seq][i][s:e] for seq, s, e in rows]) for i in range(3))
        got = paged_attention(q, k, v, cache8, meta, SCALE, softcap, window, scales)
        ref = paged_attention(q, k, v, ref_cache, meta, SCALE, softcap, window)
        assert torch.equal(got, ref), (step, (got.float() - ref.float()).abs().max())
        if softcap is None:
            for span in meta.prefills:
                s, e = span.q_start, span.q_start + span.q_len
                a = _prefill_attention_sdpa(q[s:e], k[s:e], v[s:e], cache8, span, SCALE, window, scales)
                b = _prefill_attention_sdpa(q[s:e], k[s:e], v[s:e], ref_cache, span, SCALE, window)
                assert torch.equal(a, b)
    # What the float8 cache holds is what the reference stored, quantized.
    stored = torch.stack([quantize(ref_cache[:, 0], fp8, scales.k), quantize(ref_cache[:, 1], fp8, scales.v)], 1)
    assert torch.equal(stored.view(torch.uint8), cache8.view(torch.uint8))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (5, None), (23, None), (None, 2.0)])
def test_attention_paths_read_the_dequantized_cache(fp8, dtype, window, softcap):
    """Decodes and chunked prefills (13 to 53 cached tokens), windows, soft-capping."""
    _run_steps(STEPS, {"a": 94, "b": 36}, _step_meta, fp8, dtype, window, softcap, 0)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("window", [None, 3])
def test_multi_query_rows_read_the_dequantized_cache(fp8, window):
    """Speculative rows attended together with the decodes (the CPU spec-decoding path)."""
    _run_steps(MQ_STEPS, MQ_LENGTHS, _multi_query_step_meta, fp8, torch.float32, window, None, 1)


# ---- models ------------------------------------------------------------------------------------
class _Recorded:
    """An LLM whose every computed logits matrix is kept (one request at a time: one row a step)."""

    def __init__(self, model: str, kv_cache_dtype: str, **kw) -> None:
        self.llm = LLM(model, kv_cache_dtype=kv_cache_dtype, num_kv_blocks=256, **kw)
        self.logits: list[torch.Tensor] = []
        module = self.llm.engine.runner.model
        compute = module.compute_logits

        def recorded(hidden: torch.Tensor) -> torch.Tensor:
            out = compute(hidden)
            self.logits.append(out.float().clone())
            return out

        module.compute_logits = recorded

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
        self.logits = []
        out = self.llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return out[0].outputs[0].token_ids, [x[-1] for x in self.logits]


def _compare(model: str, name: str, lens: tuple[int, ...], n: int = 32, **kw) -> float:
    """Greedy decoding of each prompt with a bf16 and a float8 cache: the logits of every step whose
    context the two share are within LOGIT_TOL of the largest logit, the first differing token is a
    near-tie in the bf16 logits; returns the share of positions whose tokens agree."""
    ref, fp8 = _Recorded(model, "auto", **kw), _Recorded(model, name, **kw)
    try:
        agree = 0
        for prompt in prompts(lens):
            a, la = ref.greedy(prompt, n)
            b, lb = fp8.greedy(prompt, n)
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), n)
            for i in range(min(first + 1, n)):  # the same context up to and including step i
                tol = LOGIT_TOL * la[i].abs().max().item()
                assert (la[i] - lb[i]).abs().max().item() <= tol, (model, name, len(prompt), i)
            if first < n:
                assert la[first][a[first]] - la[first][b[first]] <= 2 * LOGIT_TOL * la[first].abs().max()
            agree += sum(x == y for x, y in zip(a, b, strict=True))
        return agree / (n * len(lens))
    finally:
        ref.llm.close()
        fp8.llm.close()


def test_fp8_logits_close_to_bf16_and_greedy_tokens_mostly_agree():
    assert _compare(TINY, "fp8", (40, 90, 150, 200, 260, 300)) >= 0.5
    _compare(TINY, "fp8_e5m2", (90, 200))  # 2 mantissa bits: close logits, near-ties flip more often


def test_fp8_with_sliding_windows():
    """gemma3-tiny: 16-token windows on layers 0 and 2, prompts far past them, chunked prefill."""
    _compare("dummy:gemma3-tiny", "fp8", (40, 150), max_num_batched_tokens=64)


def test_fp8_moe_and_chunked_prefill():
    _compare("dummy:qwen3-moe-tiny", "fp8", (150,), max_num_batched_tokens=32)


def test_fp8_prefix_cache_blocks_are_reused():
    """A prompt that extends an earlier one reuses its float8 blocks: same tokens' bytes, and the
    output of the extension stays close to a fresh (uncached) computation."""
    first, = prompts((64,))
    longer = first + prompts((30,), seed=2)[0]
    cached = _Recorded(TINY, "fp8")
    fresh = _Recorded(TINY, "fp8", enable_prefix_caching=False)
    try:
        cached.greedy(first, 4)
        eng = cached.llm.engine
        hits = eng.stats().prefix_cache_hits
        toks, logits = cached.greedy(longer, 16)
        assert eng.stats().prefix_cache_hits - hits == 64  # four full blocks of the first prompt
        ref_toks, ref_logits = fresh.greedy(longer, 16)
        tol = LOGIT_TOL * ref_logits[0].abs().max().item()
        assert (logits[0] - ref_logits[0]).abs().max().item() <= tol
        assert sum(x == y for x, y in zip(toks, ref_toks, strict=True)) >= 8
    finally:
        cached.llm.close()
        fresh.llm.close()


def test_fp8_with_speculative_decoding_equals_plain_fp8():
    """The CPU multi-query path (drafts verified with the decodes) reads the float8 cache as decode does."""
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    passage = prompts((24,), seed=3)[0]
    ps = [passage * 3, passage[:5] * 6]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = []
    for kw in ({}, {"speculative_config": spec}):
        llm = LLM(TINY, dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=96, **kw)
        try:
            outs.append([o.outputs[0].token_ids for o in llm.generate(ps, sp)])
            if kw:
                assert llm.spec_decode_stats().num_accepted_tokens > 0
        finally:
            llm.close()
    assert outs[0] == outs[1]


def test_checkpoint_kv_scales_are_used(tmp_path):
    """k_scale / v_scale tensors per attention layer (llm-compressor's names; kv_scale for both) are
    read, travel in the layout, and quantize the cache: with a k scale of 4, 960 is stored as 240,
    where a scale of 1 would clip it to 448."""
    path = export_model(TINY, tmp_path / "m")
    save_file({
        "model.layers.0.self_attn.k_scale": torch.tensor(4.0),
        "model.layers.0.self_attn.v_scale": torch.tensor([0.5]),
        "model.layers.1.self_attn.kv_scale": torch.tensor(2.0),
    }, str(path / "kv-scales.safetensors"))
    eng = LLMEngine(EngineConfig(model=str(path), cache=CacheConfig(num_kv_blocks=32, cache_dtype="fp8")))
    auto = LLMEngine(EngineConfig(model=str(path), cache=CacheConfig(num_kv_blocks=32)))
    try:
        assert eng.layout.scales == (KVScales(4.0, 0.5), KVScales(2.0, 2.0))
        assert auto.layout.scales == ()  # scales matter only to a float8 cache
        layer0 = eng.loaded.module.model.layers[0].self_attn
        assert layer0.kv_scales == KVScales(4.0, 0.5)
        big = torch.full((1, 2, 16), 960.0)
        from tests.unit.paged import make_meta

        meta, _ = make_meta([], [([3], 0, 1)])
        kv = torch.zeros(8, 2, 2, BS, 16, dtype=torch.float8_e4m3fn)
        paged_attention(torch.zeros(1, 4, 16), big, big, kv, meta, 0.25, scales=KVScales(4.0, 0.5))
        assert kv[3, 0, :, 0].float().eq(240.0).all()  # 960 / 4
        assert kv[3, 1, :, 0].float().eq(448.0).all()  # 960 / 0.5, clipped to e4m3's largest
    finally:
        eng.close()
        auto.close()
