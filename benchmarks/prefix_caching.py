"""What prefix caching saves, and what it costs when nothing is shared: one engine with caching
on against one with it off, in the same run, as ratios.

    .venv/bin/python benchmarks/prefix_caching.py [--model dummy:qwen3-cpu-bench] [--rounds 3]

Two workloads, each a batch of `--batch` requests per round (temperature 0, ignore_eos):
- shared: a `--prefix-len`-token system prompt shared by every request, then `--suffix-len` tokens
  of its own, `--shared-output-len` tokens out. Each round has fresh suffixes; the prefix is
  cached from the warm-up on (a server's steady state). Reported: seconds per round (prefill-bound).
- unshared: `--input-len` random tokens, `--output-len` out: nothing to reuse; the cost of hashing
  and registering blocks on the decode path. Reported: generated tokens/s.
Each round runs both engines in a rotated order so drift cancels; medians of the rounds. One thread
pinned to --cpu. The outputs of both engines are checked equal (greedy).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import one_core
import torch

from pdserve import LLM, SamplingParams


def main() -> None:
    p = one_core.parser(__doc__, batch=8)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--shared-output-len", type=int, default=8)
    a = p.parse_args()
    one_core.pin(a.cpu)
    max_len = max(a.prefix_len + a.suffix_len + a.shared_output_len, a.input_len + a.output_len) + 16
    engines = {
        on: LLM(a.model, max_model_len=max_len, max_num_seqs=max(a.batch, 16), enable_prefix_caching=on)
        for on in (False, True)
    }
    vocab = engines[True].engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (a.prefix_len,), generator=g).tolist()

    def rand(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    def workload(kind: str, n: int) -> tuple[list[list[int]], SamplingParams]:
        if kind == "shared":
            prompts = [prefix + rand(a.suffix_len) for _ in range(n)]
            return prompts, SamplingParams(max_tokens=a.shared_output_len, temperature=0.0, ignore_eos=True)
        return [rand(a.input_len) for _ in range(n)], SamplingParams(max_tokens=a.output_len, temperature=0.0,
                                                                      ignore_eos=True)

    for kind in ("shared", "unshared"):  # warm-up; after it, the shared prefix is cached
        prompts, sp = workload(kind, 1)
        for llm in engines.values():
            _timed(llm, prompts, sp)
    shared_s: dict[bool, list[float]] = {False: [], True: []}
    unshared_tps: dict[bool, list[float]] = {False: [], True: []}
    for r in range(a.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        for kind in ("shared", "unshared"):
            prompts, sp = workload(kind, a.batch)
            results = {on: _timed(engines[on], prompts, sp) for on in order}
            if results[True][1] != results[False][1]:
                raise SystemExit(f"round {r} {kind}: outputs differ with prefix caching")
            for on, (seconds, outs) in results.items():
                if kind == "shared":
                    shared_s[on].append(seconds)
                else:
                    unshared_tps[on].append(sum(map(len, outs)) / seconds)
    med_s = {on: statistics.median(v) for on, v in shared_s.items()}
    med_tps = {on: statistics.median(v) for on, v in unshared_tps.items()}
    stats = engines[True].engine.stats()
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json")
    res = {
        "command": f"benchmarks/prefix_caching.py {flags}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "shared_seconds_per_round": {"off": med_s[False], "on": med_s[True]},
        "shared_speedup": med_s[False] / med_s[True],
        "unshared_tokens_per_s": {"off": med_tps[False], "on": med_tps[True]},
        "unshared_on_vs_off": med_tps[True] / med_tps[False],
        "prefix_cache_hit_rate": stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1),
        "rounds": {"shared_s": {str(k): v for k, v in shared_s.items()},
                   "unshared_tps": {str(k): v for k, v in unshared_tps.items()}},
    }
    print(json.dumps(res, indent=2))
    one_core.write_json(a.json, res)
    for llm in engines.values():
        llm.close()


def _timed(llm: LLM, prompts: list[list[int]], sp: SamplingParams) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    return time.perf_counter() - t0, [o.outputs[0].token_ids for o in outs]


if __name__ == "__main__":
    main()
