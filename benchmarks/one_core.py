"""What the offline one-core benchmarks share: their common flags, pinning to one core with one
thread, and writing the figures. Imported by the scripts next to it (run as
`.venv/bin/python benchmarks/<script>.py`, whose folder is then on sys.path)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from pdserve import LLM, SamplingParams


def parser(doc: str | None, *, model: str = "dummy:qwen3-cpu-bench", batch: int | None = 16,
           input_len: int = 128, output_len: int = 64, rounds: int = 3, cpu: int = 0) -> argparse.ArgumentParser:
    """A parser with --model, --batch (unless None: the script adds its own), --input-len,
    --output-len, --rounds, --cpu and --json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model)
    if batch is not None:
        p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--input-len", type=int, default=input_len)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--cpu", type=int, default=cpu)
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def pin(cpu: int) -> None:
    """This process on core `cpu`, torch on one thread."""
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)


def write_json(path: str | None, result: object) -> None:
    """The figures as JSON at `path` (nothing when None)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def prefill_then_decode(llm: LLM, prompts: list[list[int]], steps: int, tag: str) -> tuple[float, float | None]:
    """All `prompts` added at once (greedy, `steps` + 1 tokens each): (seconds until every one is
    prefilled, the median decode step's seconds at the whole batch; None with no steps)."""
    eng = llm.engine
    sp = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", p, sp)
    t0 = time.perf_counter()
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
        eng.step()
    prefill = time.perf_counter() - t0
    times = []
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    return prefill, statistics.median(times) if steps else None
