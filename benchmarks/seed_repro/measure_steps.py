"""Step times of one engine pinned to one core: the numbers the seed_repro scaling is derived from.

Prefill: one request of `--input-len` tokens (its first step, whole prompt in one chunk).
Decode: `--batch` requests decoding together, the median time of one step.
Runs in-process with `LLMEngine` (no HTTP), so it measures the model, not the server.

    .venv/bin/python benchmarks/seed_repro/measure_steps.py --model dummy:qwen3-cpu-bench \
        --input-len 512 --batch 1 4 8 16 --cpu 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pdserve.config import CacheConfig, EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def measure_prefill(engine: LLMEngine, input_len: int, repeats: int) -> float:
    """Median seconds of the step that computes a whole `input_len`-token prompt."""
    times = []
    for i in range(repeats + 1):  # the first one warms up
        engine.add_request(f"p{i}", _prompt(input_len, i), SamplingParams(max_tokens=1, temperature=0.0))
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        engine.run_until_done()
    return statistics.median(times[1:])


def measure_decode(engine: LLMEngine, batch: int, context: int, steps: int) -> float:
    """Median seconds of one decode step with `batch` running requests of ~`context` tokens."""
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", _prompt(context, 100 + i), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    engine.run_until_done()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:qwen3-cpu-bench")
    p.add_argument("--input-len", type=int, nargs="+", default=[512])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--context", type=int, default=None, help="decode context (default: first --input-len)")
    p.add_argument("--cpu", type=int, default=0, help="the one core to pin to")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    cache = CacheConfig(num_kv_blocks=2048, enable_prefix_caching=False)  # repeats reuse prompts: compute them
    cfg = EngineConfig(model=args.model, threads=1, cpus=(args.cpu,), cache=cache)
    engine = LLMEngine(cfg)
    out: dict[str, object] = {"model": args.model, "cpu": args.cpu, "dtype": str(engine.dtype)}
    prefill = {n: measure_prefill(engine, n, args.repeats) for n in args.input_len}
    for n, t in prefill.items():
        print(f"prefill {n:5d} tokens: {t * 1e3:8.1f} ms  ({n / t:.0f} tok/s)")
    ctx = args.context or args.input_len[0]
    decode = {b: measure_decode(engine, b, ctx, args.steps) for b in args.batch}
    for b, t in decode.items():
        print(f"decode step, batch {b:3d} (context ~{ctx}): {t * 1e3:8.1f} ms  ({b / t:.1f} tok/s)")
    out |= {"prefill_s": prefill, "decode_step_s": decode, "decode_context": ctx}
    engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
