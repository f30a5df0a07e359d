"""What freeing out-of-window KV blocks buys a sliding-window model in a fixed KV cache: one engine
with it against one without, in the same run, as ratios.

    .venv/bin/python benchmarks/window_free.py [--model dummy:mistral-tiny] [--num-kv-blocks 64]

A batch of `--batch` requests (`--input-len` random tokens, `--output-len` out, greedy, ignore_eos)
on a cache of `--num-kv-blocks` blocks of 16 tokens. Without freeing, a request holds its whole
context, so few fit at once and the scheduler preempts (recompute); with freeing, each holds about
(window + chunk) / 16 + 1 blocks. Reported per engine: seconds for the batch (median of the rounds,
engines in rotated order), the most requests running at once, preemptions, blocks freed early.
Outputs are checked equal. One thread pinned to --cpu.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import one_core
import torch

from pdserve import LLM, SamplingParams


def timed(llm: LLM, prompts: list[list[int]], sp: SamplingParams, tag: str) -> tuple[float, list[list[int]], int]:
    """(seconds, outputs, the most requests running at once) for the batch."""
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", p, sp)
    outs: dict[str, list[int]] = {}
    most = 0
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        most = max(most, len(eng.scheduler.running))
    seconds = time.perf_counter() - t0
    return seconds, [outs[f"{tag}-{i}"] for i in range(len(prompts))], most


def main() -> None:
    p = one_core.parser(__doc__, model="dummy:mistral-tiny", batch=8, input_len=64, output_len=448)
    p.add_argument("--num-kv-blocks", type=int, default=64)
    a = p.parse_args()
    one_core.pin(a.cpu)
    engines = {on: LLM(a.model, dtype="float32", num_kv_blocks=a.num_kv_blocks, enable_prefix_caching=False,
                       max_model_len=a.input_len + a.output_len + 16) for on in (False, True)}
    engines[False].engine.scheduler.reclaimer = None
    vocab = engines[True].engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    most: dict[bool, int] = {}
    for r in range(a.rounds + 1):  # round 0: warm-up
        prompts = [torch.randint(0, vocab, (a.input_len,), generator=g).tolist() for _ in range(a.batch)]
        results = {on: timed(engines[on], prompts, sp, f"r{r}") for on in ([False, True] if r % 2 else [True, False])}
        if results[True][1] != results[False][1]:
            raise SystemExit(f"round {r}: outputs differ with freeing")
        for on, (s, _, m) in results.items():
            most[on] = m
            if r:
                seconds[on].append(s)
    med = {on: statistics.median(v) for on, v in seconds.items()}
    stats = {on: engines[on].engine.stats() for on in (False, True)}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json")
    res = {
        "command": f"benchmarks/window_free.py {flags}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "window": engines[True].engine.model_config.kv_window,
        **{("freeing" if on else "no_freeing"): {
            "batch_seconds": med[on], "most_running": most[on], "preemptions": stats[on].num_preemptions,
            "blocks_freed_early": stats[on].num_window_freed_blocks} for on in (False, True)},
        "time_no_freeing_over_freeing": med[False] / med[True],
    }
    print(res)
    one_core.write_json(a.json, res)


if __name__ == "__main__":
    main()
