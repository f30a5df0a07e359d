"""What n-gram speculative decoding buys on this CPU: TPOT, ITL and acceptance with and without
`speculative_config`, in the same run, as ratios.

    .venv/bin/python benchmarks/spec_decode.py [--model dummy:qwen3-cpu-bench] [--batch 1 4] [--rounds 3]

Two engines of the same random weights (one process, pinned to --cpu, one thread), greedy. In
float32 the outputs are checked token for token equal; in bfloat16 (the CPU's packed AVX512-BF16
path) a verified row's logits can differ from a one-token decode's by one bf16 ulp (other GEMM
shapes), which flips exact ties of the argmax: the first token where the two runs part is reported.
Workloads (`--batch` prompts of `--input-len` tokens, `--output-len`
tokens each, ignore_eos):

* repeat: each prompt is a random unit of 1..8 tokens repeated; with random weights the greedy
  output soon falls into a loop too, which the n-gram proposer copies (outputs that repeat their
  context: the case speculation is for).
* random: random tokens; the output seldom repeats, so drafts are few and mostly rejected (what
  speculation costs when it does not help).

Each round runs every (workload, engine) pair once in a rotated order so that drift cancels; the
median round's figures are reported. TPOT: (last token - first token) / (tokens - 1) per request,
averaged; ITL: the gap between consecutive outputs of a request (a verified step hands several
tokens over at once, as a stream would get them), median and p99; per-token ITL: that gap split
evenly over its tokens (what /metrics' histogram records). These are wall-clock figures, which on a
shared machine include the time the pinned thread waits for its core; decode CPU ms per token (the
engine thread's CPU time, torch running on that one thread, from the step after every request has
its first token to the end, over the tokens emitted then) is the contention-proof cost.

`--per-span-baseline` adds a third engine, "spec_per_span": speculation with every speculative row
attended as its own prefill span (what CUDA does, and what the CPU did before a step's speculative
rows and decodes were attended together as multi-query rows: attention.MultiQueryRows), in the
same rotation, for a same-run comparison of the two attention paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import one_core
import torch

from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from pdserve.engine import runner
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Run:
    tpot_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    per_token_itl_ms: float
    output_tokens_per_s: float
    decode_cpu_ms_per_token: float
    tokens: list[list[int]]
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0


def prompts(workload: str, batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    if workload == "random":
        return [torch.randint(0, vocab, (input_len,), generator=g).tolist() for _ in range(batch)]
    units = [torch.randint(0, vocab, (1 + i % 8,), generator=g).tolist() for i in range(batch)]
    return [(u * input_len)[:input_len] for u in units]


def measure(engine: LLMEngine, ps: list[list[int]], output_len: int) -> Run:
    """Generate greedily, timing every output of every request."""
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    before = engine.spec_stats
    times: dict[str, list[tuple[float, int]]] = {}
    tokens: dict[str, list[int]] = {}
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, sp)
        times[f"r{i}"], tokens[f"r{i}"] = [], []
    t0 = time.perf_counter()
    cpu_decode, n_decode = 0.0, 0  # CPU time and tokens of the steps after every first token
    while engine.has_unfinished():
        decoding = all(tokens.values())
        cpu0 = time.thread_time()
        outs = engine.step()
        cpu, now = time.thread_time() - cpu0, time.perf_counter()
        for out in outs:
            if out.new_token_ids:
                times[out.request_id].append((now, len(out.new_token_ids)))
                tokens[out.request_id] += out.new_token_ids
        if decoding:
            cpu_decode += cpu
            n_decode += sum(len(o.new_token_ids) for o in outs)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(t) for t in tokens.values())
    tpots, gaps, per_token = [], [], []
    for ts in times.values():
        n = sum(k for _, k in ts)
        tpots.append((ts[-1][0] - ts[0][0]) / (n - 1))
        for (a, _), (b, k) in zip(ts, ts[1:], strict=False):
            gaps.append(b - a)
            per_token += [(b - a) / k] * k
    gaps.sort()
    after = engine.spec_stats
    return Run(
        tpot_ms=1000 * statistics.mean(tpots),
        itl_p50_ms=1000 * statistics.median(gaps),
        itl_p99_ms=1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
        per_token_itl_ms=1000 * statistics.mean(per_token),
        output_tokens_per_s=n_out / elapsed,
        decode_cpu_ms_per_token=1000 * cpu_decode / n_decode,
        tokens=[tokens[f"r{i}"] for i in range(len(ps))],
        drafts=after.num_drafts - before.num_drafts,
        draft_tokens=after.num_draft_tokens - before.num_draft_tokens,
        accepted=after.num_accepted_tokens - before.num_accepted_tokens,
    )


def make_engine(a: argparse.Namespace, speculative: SpeculativeConfig | None) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=a.model, dtype=a.dtype, seed=0, threads=1,
        cache=CacheConfig(enable_prefix_caching=False),  # every run computes its prompts
        scheduler=SchedulerConfig(max_num_seqs=max(a.batch), max_model_len=a.input_len + a.output_len + 16),
        speculative=speculative,
    ))


def summary(runs: list[Run]) -> dict[str, float]:
    keys = ("tpot_ms", "itl_p50_ms", "itl_p99_ms", "per_token_itl_ms", "output_tokens_per_s", "decode_cpu_ms_per_token")
    out = {k: statistics.median(getattr(r, k) for r in runs) for k in keys}
    drafts, draft_tokens, accepted = (sum(getattr(r, k) for r in runs) for k in ("drafts", "draft_tokens", "accepted"))
    if draft_tokens:
        out["acceptance_rate"] = accepted / draft_tokens
        out["mean_acceptance_length"] = 1 + accepted / drafts
        out["draft_tokens_per_output_token"] = draft_tokens / sum(len(t) for r in runs for t in r.tokens)
    return out


@contextmanager
def attention_path(name: str) -> Iterator[None]:
    """While measuring "spec_per_span": no multi-query rows, each speculative row its own span."""
    supported = runner.multi_query_supported
    if name == "spec_per_span":
        runner.multi_query_supported = lambda device: False
    try:
        yield
    finally:
        runner.multi_query_supported = supported


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """The first output position where any request's tokens differ between two runs; None if none."""
    parts = [next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), None)
             for p, q in zip(a, b, strict=True)]
    return min((i for i in parts if i is not None), default=None)


def main() -> None:
    p = one_core.parser(__doc__, batch=None, rounds=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    p.add_argument("--per-span-baseline", action="store_true",
                   help="also measure speculation with per-span attention of speculative rows")
    a = p.parse_args()
    one_core.pin(a.cpu)
    spec_cfg = SpeculativeConfig(a.num_speculative_tokens, a.prompt_lookup_max, a.prompt_lookup_min)
    engines = {"plain": make_engine(a, None), "spec": make_engine(a, spec_cfg)}
    if a.per_span_baseline:
        engines["spec_per_span"] = make_engine(a, spec_cfg)
    vocab = engines["plain"].model_config.vocab_size
    cases = [(w, b) for b in a.batch for w in ("repeat", "random")]
    workloads = {c: prompts(c[0], c[1], a.input_len, vocab, seed=i) for i, c in enumerate(cases)}
    for name, engine in engines.items():  # warm-up
        with attention_path(name):
            measure(engine, workloads[cases[0]], 8)
    pairs = [(c, e) for c in cases for e in engines]
    runs: dict[tuple, list[Run]] = {pair: [] for pair in pairs}
    for r in range(a.rounds):
        for case, name in pairs[r % len(pairs):] + pairs[: r % len(pairs)]:
            with attention_path(name):
                runs[(case, name)].append(measure(engines[name], workloads[case], a.output_len))
            print(f"round {r} {case} {name}: {runs[(case, name)][-1].tpot_ms:.1f} ms TPOT", flush=True)
    results = []
    for case in cases:
        plain, spec = summary(runs[(case, "plain")]), summary(runs[(case, "spec")])
        parted = [first_difference(x.tokens, y.tokens)
                  for x, y in zip(runs[(case, "plain")], runs[(case, "spec")], strict=True)]
        results.append({
            "workload": case[0], "batch": case[1], "plain": plain, "spec": spec,
            "identical_outputs": all(d is None for d in parted),
            "first_difference": min((d for d in parted if d is not None), default=None),
            "spec_vs_plain": {k: spec[k] / plain[k] for k in plain},
        })
        if a.per_span_baseline:
            per_span = summary(runs[(case, "spec_per_span")])
            results[-1].update({
                "spec_per_span": per_span,
                "spec_per_span_vs_plain": {k: per_span[k] / plain[k] for k in plain},
                "spec_vs_spec_per_span": {k: spec[k] / per_span[k] for k in plain},
            })
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else
                                                   f" {' '.join(map(str, v)) if isinstance(v, list) else v}")
                     for k, v in vars(a).items() if k != "json" and v is not False)
    res = {
        "command": f".venv/bin/python benchmarks/spec_decode.py {flags}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, pinned to core {a.cpu}",
        "date": time.strftime("%Y-%m-%d"),
        "speculative_config": vars(spec_cfg),
        "results": results,
    }
    print(json.dumps(res, indent=2))
    one_core.write_json(a.json, res)
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
