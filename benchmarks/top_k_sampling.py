"""What top-k / top-p sampling costs with a real vocabulary, and what the partial top-k saves: offline
decode throughput with Qwen3's generation defaults (temperature 0.6, top_k 20, top_p 0.95) against
plain sampling (temperature 0.6), with the sampler's partial top-k and with the full sort of the
vocabulary it replaces, in the same run, as ratios.

    .venv/bin/python benchmarks/top_k_sampling.py [--model dummy:qwen3-0.6b] [--rounds 3]

One engine (pinned to --cpu, one thread), `--batch` prompts of `--input-len` random tokens,
`--output-len` tokens each (ignore_eos, seeded). Each round runs every variant once, in a rotated
order; the median round's tokens/s per variant is reported. The sort variant sets the sampler's
TOP_K_PARTIAL_MAX to 0 for its run. The two may sample different tokens where bf16 logits tie at the
20th place (each breaks such ties arbitrarily); in float32 they sample the same (tests/unit/test_sampling.py).
"""

from __future__ import annotations

import platform
import statistics
import time

import one_core
import torch

import pdserve.engine.sampler as sampler
from pdserve import LLM, SamplingParams

QWEN3_DEFAULTS = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}


def main() -> None:
    ap = one_core.parser(__doc__, model="dummy:qwen3-0.6b", batch=8, input_len=64, output_len=32, cpu=1)
    ap.set_defaults(json="benchmarks/results/top_k_sampling_2026-11-27.json")
    args = ap.parse_args()
    one_core.pin(args.cpu)
    llm = LLM(args.model, enable_prefix_caching=False, num_kv_blocks=256)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (args.input_len,), generator=g).tolist() for _ in range(args.batch)]
    base = {"max_tokens": args.output_len, "ignore_eos": True, "seed": 1}
    variants = {
        "temperature 0.6": (SamplingParams(**base, temperature=0.6), None),
        "top_k 20 + top_p 0.95, partial top-k": (SamplingParams(**base, **QWEN3_DEFAULTS), None),
        "top_k 20 + top_p 0.95, full sort": (SamplingParams(**base, **QWEN3_DEFAULTS), 0),
    }
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, list[list[int]]] = {}
    names = list(variants)
    default_max = sampler.TOP_K_PARTIAL_MAX
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sp, limit = variants[name]
            sampler.TOP_K_PARTIAL_MAX = default_max if limit is None else limit
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp)
            rates[name].append(args.batch * args.output_len / (time.perf_counter() - t0))
            outputs[name] = [o.outputs[0].token_ids for o in outs]
    sampler.TOP_K_PARTIAL_MAX = default_max
    same = outputs[names[1]] == outputs[names[2]]
    plain = statistics.median(rates[names[0]])
    result = {
        "command": "benchmarks/top_k_sampling.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "partial_and_sort_sample_the_same_tokens": same,  # bf16 ties at the k-th place differ
        "variants": {n: {"tokens_per_s": statistics.median(v), "vs_plain": statistics.median(v) / plain, "rounds": v}
                     for n, v in rates.items()},
    }
    for n, v in result["variants"].items():
        print(f"{n:40s} {v['tokens_per_s']:8.1f} tok/s  {v['vs_plain']:.2f}x")
    print("same tokens:", same)
    one_core.write_json(args.json, result)


if __name__ == "__main__":
    main()
