"""Does the engine itself hold memory per request? Runs the offline engine (no HTTP, no KV
transfer) over batches of random prompt lengths and max_tokens, and prints the process RSS and the
Python heap (tracemalloc) every `--report` requests. A leak of Python objects shows as a growing
heap; native caches keyed by tensor shape (oneDNN primitives, the allocator's free lists) show as
RSS that rises while new shapes appear and then stays flat.

    .venv/bin/python benchmarks/engine_rss.py [--requests 6400] [--model dummy:qwen3-tiny]
"""

from __future__ import annotations

import argparse
import gc
import random
import tracemalloc

import psutil

from pdserve import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=6400)
    ap.add_argument("--report", type=int, default=640)
    ap.add_argument("--model", default="dummy:qwen3-tiny")
    args = ap.parse_args()
    llm = LLM(args.model, num_kv_blocks=512, max_num_seqs=16, threads=1)
    rng = random.Random(0)
    proc = psutil.Process()
    tracemalloc.start()
    done = 0
    while done < args.requests:
        prompts = [[rng.randrange(250) for _ in range(rng.randint(1, 400))] for _ in range(16)]
        params = [SamplingParams(max_tokens=rng.randint(1, 64), temperature=0, ignore_eos=True) for _ in prompts]
        llm.generate(prompts, params)
        done += len(prompts)
        if done % args.report == 0:
            gc.collect()
            heap, _ = tracemalloc.get_traced_memory()
            print(f"{done} requests: RSS {proc.memory_info().rss / 2**20:.0f} MiB, "
                  f"Python heap {heap / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
