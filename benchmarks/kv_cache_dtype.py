"""What --kv-cache-dtype fp8 buys and costs against the model's bf16 KV cache, in one run, as ratios.

    .venv/bin/python benchmarks/kv_cache_dtype.py [--model dummy:qwen3-cpu-bench] [--rounds 2]
        [--json benchmarks/results/kv_cache_dtype_2026-11-27.json]

- capacity: KV blocks in the same --kv-cache-memory (1 GiB), and the bytes a transfer moves per
  block (all layers: what shm / tcp / cuda_ipc copy, byte for byte);
- speed: per round and KV dtype (rotated order), `--batch` requests of `--input-len` random tokens
  prefilled (seconds: the prefill time) then `--output-len` decode steps at that batch (median step
  time); medians over rounds, reported as fp8 / bf16;
- accuracy: `--accuracy-prompts` prompts decoded greedily one at a time by both; the share of
  output positions whose tokens agree, and the largest logit difference over the steps whose
  context the two still share (absolute, and relative to the largest |logit|).
One thread pinned to --cpu.
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
from pdserve.config import CacheConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_cache import plan_layout

DTYPES = ("auto", "fp8")


def capacity(llm: LLM, gib: float) -> dict:
    eng: LLMEngine = llm.engine
    layout = plan_layout(eng.model_config, CacheConfig(kv_cache_gib=gib), eng.layout.dtype, eng.layout.scales)
    return {"dtype": str(layout.dtype).removeprefix("torch."), "blocks": layout.num_blocks,
            "bytes_per_block_moved": layout.num_layers * layout.block_bytes}



def greedy_logits(llm: LLM, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    rows: list[torch.Tensor] = []
    module = llm.engine.runner.model
    compute = module.compute_logits
    def recorded(hidden: torch.Tensor) -> torch.Tensor:
        logits = compute(hidden)
        rows.append(logits)
        return logits

    module.compute_logits = recorded  # type: ignore[method-assign]
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    finally:
        module.compute_logits = compute  # type: ignore[method-assign]
    return out[0].outputs[0].token_ids, [r[-1].float() for r in rows]


def accuracy(llms: dict[str, LLM], prompts: list[list[int]], n: int) -> dict:
    agree = total = 0
    max_abs = max_rel = 0.0
    for p in prompts:
        a, la = greedy_logits(llms["auto"], p, n)
        b, lb = greedy_logits(llms["fp8"], p, n)
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), n)
        for i in range(min(first + 1, n)):  # same context through step i
            diff = (la[i] - lb[i]).abs().max().item()
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / la[i].abs().max().item())
        agree += sum(x == y for x, y in zip(a, b, strict=True))
        total += n
    return {"greedy_token_agreement": agree / total, "max_logit_diff": max_abs, "max_logit_diff_relative": max_rel}


def main() -> None:
    p = one_core.parser(__doc__, batch=16, input_len=1000, output_len=32, rounds=2)
    p.add_argument("--accuracy-prompts", type=int, default=4)
    p.add_argument("--accuracy-tokens", type=int, default=32)
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB, for the capacity figures")
    a = p.parse_args()
    one_core.pin(a.cpu)
    max_len = a.input_len + a.output_len + 16
    llms = {d: LLM(a.model, kv_cache_dtype=d, max_model_len=max_len, max_num_seqs=a.batch,
                   enable_prefix_caching=False) for d in DTYPES}
    vocab = llms["auto"].engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    cap = {d: capacity(llm, a.kv_cache_memory) for d, llm in llms.items()}
    for llm in llms.values():  # warm-up
        one_core.prefill_then_decode(llm, [rand(64)], 2, "warm")
    prefill: dict[str, list[float]] = {d: [] for d in DTYPES}
    step: dict[str, list[float]] = {d: [] for d in DTYPES}
    for r in range(a.rounds):
        prompts = [rand(a.input_len) for _ in range(a.batch)]
        for d in DTYPES if r % 2 == 0 else DTYPES[::-1]:
            pre, dec = one_core.prefill_then_decode(llms[d], prompts, a.output_len, f"r{r}")
            prefill[d].append(pre)
            step[d].append(dec)
    acc = accuracy(llms, [rand(a.input_len // 2) for _ in range(a.accuracy_prompts)], a.accuracy_tokens)
    med_pre = {d: statistics.median(v) for d, v in prefill.items()}
    med_step = {d: statistics.median(v) for d, v in step.items()}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json")
    res = {
        "command": f"benchmarks/kv_cache_dtype.py {flags}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "capacity": cap,
        "blocks_ratio_fp8_over_bf16": cap["fp8"]["blocks"] / cap["auto"]["blocks"],
        "bytes_per_block_ratio_fp8_over_bf16":
            cap["fp8"]["bytes_per_block_moved"] / cap["auto"]["bytes_per_block_moved"],
        "prefill_seconds": med_pre,
        "prefill_ratio_fp8_over_bf16": med_pre["fp8"] / med_pre["auto"],
        "decode_step_seconds": med_step,
        "decode_step_ratio_fp8_over_bf16": med_step["fp8"] / med_step["auto"],
        "accuracy": acc,
        "rounds": {"prefill_s": prefill, "decode_step_s": step},
    }
    print(json.dumps(res, indent=2))
    one_core.write_json(a.json, res)
    for llm in llms.values():
        llm.close()


if __name__ == "__main__":
    main()
