"""gpu_check.py's model stage: hardware limits, then one model's decode and prefill against them.

Limits (this process, just before the model loads): HBM copy bandwidth (a large device-to-device
copy, bytes read + written over time) and the bf16 GEMM rate (square matmul). Model (dummy
weights drawn on the device, so an 8B model is ready in seconds), bf16, CUDA graphs on:

- decode step at each batch size with `ctx`-token contexts: the engine's whole step on the wall
  clock (schedule, staging, graph replay, sampling, the one host sync), the graph replay alone on
  CUDA events, and the same step eagerly (the static path switched off) for comparison. Its limit
  (roofline) is the bytes a step must read over the copy bandwidth: the weights (the issue's
  definition, all parameters) and, beside it, weights without the embedding plus the KV read;
- a `ctx`-token prefill (one step, one request): wall time and the rate it implies against the
  GEMM rate (FLOPs: 2 x non-embedding params x tokens, causal attention, lm_head for one row);
- decode attention alone at the largest batch: the Triton kernel and the torch gather path.

Beside the eager step and the prefill, the same again with the fused norm/rope/KV-write/silu
kernels switched off (pdserve/model/triton_fused.py; the torch ops instead): their gain, measured
in the same run.

Timings are medians; each figure is written as soon as it is measured.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model import triton_fused


@contextlib.contextmanager
def fused_kernels_off() -> Iterator[None]:
    """The decoder's torch ops instead of triton_fused's kernels (eager steps only: a captured
    graph keeps what it captured)."""
    available = triton_fused.available
    triton_fused.available = lambda x: False
    try:
        yield
    finally:
        triton_fused.available = available


def sizes(quick: bool) -> dict:
    if quick:
        return dict(ctx=200, batches=(1, 4), steps=5, reps=2, copy_gib=0.0625, gemm_n=512)
    return dict(ctx=2000, batches=(1, 32), steps=20, reps=5, copy_gib=4.0, gemm_n=8192)


def timer(dev: torch.device, fn: Callable[[], object], reps: int, warmup: int = 2) -> list[float]:
    """Seconds per call: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def copy_rate(dev: torch.device, nbytes: int, reps: int) -> float:
    """Bytes per second of a device-to-device copy of `nbytes`, counting the read and the write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / statistics.median(timer(dev, lambda: dst.copy_(src), reps))


def gemm_rate(dev: torch.device, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul on random data."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    return 2 * n**3 / statistics.median(timer(dev, lambda: a @ b, reps, warmup=3))


def limits(dev: torch.device, copy_gib: float, gemm_n: int, reps: int) -> dict:
    nbytes = int(copy_gib * (1 << 30))
    bw = copy_rate(dev, nbytes, max(reps, 5))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    gemm = gemm_rate(dev, gemm_n, max(reps, 10))
    return {"copy_bytes": 2 * nbytes, "copy_tb_s": bw / 1e12, "gemm_n": gemm_n, "gemm_tflop_s": gemm / 1e12}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_engine(a, s: dict) -> LLMEngine:
    ctx, top = s["ctx"], max(s["batches"])
    max_len = ctx + 512
    blocks_per_seq = -(-max_len // 16)
    return LLMEngine(EngineConfig(
        model=a.model, device=a.device, dtype="bfloat16" if a.device.startswith("cuda") else "float32",
        cache=CacheConfig(num_kv_blocks=(top + 2) * blocks_per_seq + 1, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=top, max_num_batched_tokens=max(2048, ctx), max_model_len=max_len),
    ))


def model_facts(eng: LLMEngine) -> dict:
    cfg = eng.model_config
    params = list(eng.loaded.module.parameters())
    weight = sum(p.numel() * p.element_size() for p in params)
    embed = eng.loaded.module.model.embed_tokens.weight
    kv_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * eng.dtype.itemsize
    return {"weight_bytes": weight, "embedding_bytes": embed.numel() * embed.element_size(),
            "non_embedding_params": sum(p.numel() for p in params) - embed.numel()
            - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size),
            "kv_bytes_per_token": kv_token}


def prefill(eng: LLMEngine, ctx: int, reps: int) -> list[float]:
    """Wall seconds of one-step prefills of `ctx` fresh tokens (the first one a warm-up)."""
    out = []
    for i in range(reps + 1):
        eng.add_request(f"prefill-{i}", prompt(ctx, 1000 + i), SamplingParams(max_tokens=1, ignore_eos=True,
                                                                             temperature=0.0))
        sync(eng.device)
        t0 = time.perf_counter()
        outs = eng.step()
        out.append(time.perf_counter() - t0)
        assert outs and outs[0].finished, "the prefill did not finish in one step"
    return out[1:]


def decode(eng: LLMEngine, batch: int, ctx: int, steps: int, with_attention: bool) -> dict:
    """Decode steps of `batch` sequences once all are past their `ctx`-token prompts (requests
    prefilled early decode meanwhile: up to ~batch*ctx/2048 tokens more context)."""
    sp = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0.0)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        eng.add_request(rid, prompt(ctx, i), sp)
    reqs = [eng.scheduler.requests[r] for r in ids]
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
        eng.step()
    for _ in range(3):
        eng.step()

    def steps_s() -> list[float]:
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            out.append(time.perf_counter() - t0)
        return out

    ctxs = [r.num_computed_tokens for r in reqs]
    res: dict = {"context_tokens": round(statistics.mean(ctxs)), "context_range": [min(ctxs), max(ctxs)],
                 "step_ms": 1e3 * statistics.median(steps_s())}
    static = eng.runner.static
    if static is not None and static._graphs:
        graph = static._graphs[static.bucket(batch)]  # replays the last step: same KV rewritten
        res["graph_replay_ms"] = 1e3 * statistics.median(timer(eng.device, graph.replay, 10))
    eng.runner.static = None
    try:
        res["eager_step_ms"] = 1e3 * statistics.median(steps_s())
        with fused_kernels_off():
            res["eager_unfused_step_ms"] = 1e3 * statistics.median(steps_s())
    finally:
        eng.runner.static = static
    if with_attention:
        res["attention_alone"] = attention_alone(eng, reqs, 20)
    for rid in ids:
        eng.abort_request(rid)
    eng.step()
    return res


def attention_alone(eng: LLMEngine, reqs, reps: int) -> dict:
    """Decode attention of layer 0 for these requests: the Triton kernel vs the torch gather."""
    from pdserve.model import triton_decode
    from pdserve.model.attention import AttentionMetadata, _decode_attention_torch

    dev, cfg = eng.device, eng.model_config
    width = max(len(r.block_ids) for r in reqs)
    tables = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r in reqs], device=dev)
    lens = torch.tensor([r.num_computed_tokens for r in reqs], device=dev)
    q = torch.randn(len(reqs), cfg.num_attention_heads, cfg.head_dim, device=dev).to(eng.dtype)
    kv = eng.kv_cache.tensor[0]
    meta = AttentionMetadata(eng.layout.block_size, lens[:0], len(reqs), tables, lens)
    kv_bytes = int(lens.sum()) * 2 * cfg.num_key_value_heads * cfg.head_dim * eng.dtype.itemsize
    out = {"batch": len(reqs), "kv_bytes_one_layer": kv_bytes}
    scale = cfg.head_dim**-0.5
    t = statistics.median(timer(dev, lambda: _decode_attention_torch(q, kv, meta, scale), reps))
    out |= {"torch_gather_us": t * 1e6, "torch_gather_tb_s": kv_bytes / t / 1e12}
    if dev.type == "cuda" and triton_decode.supported(q, kv):
        t = statistics.median(timer(dev, lambda: triton_decode.paged_decode_attention(q, kv, tables, lens, scale),
                                    reps))
        out |= {"triton_us": t * 1e6, "triton_tb_s": kv_bytes / t / 1e12}
    return out


def run(a, rec) -> None:
    s = sizes(a.quick)
    dev = torch.device(a.device)
    with torch.inference_mode():
        lim = limits(dev, s["copy_gib"], s["gemm_n"], s["reps"])
    rec["limits"] = lim
    bw, gemm = lim["copy_tb_s"] * 1e12, lim["gemm_tflop_s"] * 1e12
    summary = [f"HBM copy {lim['copy_tb_s']:.2f} TB/s, bf16 GEMM {lim['gemm_tflop_s']:.0f} TFLOP/s"]
    rec["summary"] = summary
    t0 = time.perf_counter()
    eng = make_engine(a, s)
    sync(dev)
    rec["engine_start_s"] = time.perf_counter() - t0
    static = eng.runner.static
    rec["cuda_graph_buckets"] = static.buckets if static is not None and static._graphs else []
    facts = model_facts(eng)
    rec["model"] = {"name": a.model, "dtype": str(eng.dtype), **facts}
    cfg = eng.model_config
    try:
        ctx = s["ctx"]
        pre = prefill(eng, ctx, s["reps"])
        flops = (2 * facts["non_embedding_params"] * ctx + 2 * cfg.hidden_size * cfg.vocab_size
                 + cfg.num_hidden_layers * 4 * cfg.num_attention_heads * cfg.head_dim * ctx * (ctx + 1) // 2)
        med = statistics.median(pre)
        rec["prefill"] = {"tokens": ctx, "median_ms": 1e3 * med, "runs_ms": [1e3 * x for x in pre], "flops": flops,
                          "tflop_s": flops / med / 1e12, "gemm_limit_ms": 1e3 * flops / gemm,
                          "vs_gemm_limit": med / (flops / gemm)}
        with fused_kernels_off():
            unfused = statistics.median(prefill(eng, ctx, s["reps"]))
        rec["prefill"] = rec["prefill"] | {"unfused_median_ms": 1e3 * unfused, "fused_speedup": unfused / med}
        summary.append(f"prefill {ctx} tokens: {1e3 * med:.1f} ms ({flops / med / 1e12:.0f} TFLOP/s, "
                       f"{med / (flops / gemm):.2f}x the GEMM limit); without the fused kernels "
                       f"{1e3 * unfused:.1f} ms")
        rec["summary"] = summary
        results: dict = {}
        for batch in s["batches"]:
            r = decode(eng, batch, ctx, s["steps"], with_attention=batch == max(s["batches"]))
            kv_read = batch * r["context_tokens"] * facts["kv_bytes_per_token"]
            roof = facts["weight_bytes"] / bw
            strict = (facts["weight_bytes"] - facts["embedding_bytes"] + kv_read) / bw
            r |= {"roofline_ms": 1e3 * roof, "step_vs_roofline": r["step_ms"] / 1e3 / roof,
                  "roofline_with_kv_ms": 1e3 * strict, "step_vs_roofline_with_kv": r["step_ms"] / 1e3 / strict,
                  "kv_bytes_read": kv_read, "tokens_per_s": batch / (r["step_ms"] / 1e3)}
            results[str(batch)] = r
            rec["decode"] = results
            summary.append(
                f"decode b={batch} ctx={r['context_tokens']}: step {r['step_ms']:.2f} ms "
                f"(graph {r.get('graph_replay_ms', float('nan')):.2f} ms, eager {r['eager_step_ms']:.2f} ms, "
                f"eager unfused {r['eager_unfused_step_ms']:.2f} ms); "
                f"{r['step_vs_roofline']:.2f}x weights/BW ({1e3 * roof:.2f} ms), "
                f"{r['step_vs_roofline_with_kv']:.2f}x (weights+KV)/BW")
            rec["summary"] = summary
        at = results[str(max(s["batches"]))].get("attention_alone")
        if at:
            summary.append(f"decode attention b={at['batch']} (one layer): torch gather {at['torch_gather_us']:.0f} us"
                           + (f", Triton {at['triton_us']:.0f} us ({at['triton_tb_s']:.2f} TB/s)"
                              if "triton_us" in at else ""))
            rec["summary"] = summary
    finally:
        eng.close()
