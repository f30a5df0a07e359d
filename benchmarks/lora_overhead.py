"""What multi-LoRA costs on the decode path: one engine without LoRA, one with it enabled, in the
same run, as ratios of generated tokens/s.

    .venv/bin/python benchmarks/lora_overhead.py [--model dummy:qwen3-cpu-bench] [--rounds 3]

Each round: `--batch` prompts of `--input-len` random tokens, `--output-len` tokens out
(temperature 0, ignore_eos), in four configurations:
- base: LoRA off (the baseline);
- enabled: LoRA on, no request names an adapter (the cost of the wrappers alone);
- one: every request runs adapter a;
- mixed: half a, half b (each row its own delta: two small GEMM pairs per linear per step).
The adapters are rank `--rank` on all seven linears of every layer (random weights, PEFT's format).
Configurations rotate order each round so drift cancels; medians. One thread pinned to --cpu.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import one_core
import torch

from pdserve import LLM, LoRARequest, SamplingParams
from pdserve.model.lora_dummy import save_random_adapter
from pdserve.model.presets import get_preset


def main() -> None:
    p = one_core.parser(__doc__)
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    one_core.pin(a.cpu)
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-lora-"))
    config = get_preset(a.model.removeprefix("dummy:"))
    loras = []
    for i, name in enumerate(("a", "b")):
        save_random_adapter(tmp / name, config, a.rank, seed=i)
        loras.append(LoRARequest(name, i + 1, str(tmp / name)))
    kw = dict(max_model_len=a.input_len + a.output_len + 16, max_num_seqs=max(a.batch, 16), enable_prefix_caching=False)
    engines = {"base": LLM(a.model, **kw), "lora": LLM(a.model, enable_lora=True, max_lora_rank=a.rank, **kw)}
    vocab = config.vocab_size
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    cases = {
        "base": ("base", None),
        "enabled": ("lora", [None] * a.batch),
        "one": ("lora", [loras[0]] * a.batch),
        "mixed": ("lora", [loras[i % 2] for i in range(a.batch)]),
    }

    def run(case: str) -> float:
        engine, lora = cases[case]
        prompts = [torch.randint(0, vocab, (a.input_len,), generator=g).tolist() for _ in range(a.batch)]
        t0 = time.perf_counter()
        outs = engines[engine].generate(prompts, sp, lora_request=lora)
        dt = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt

    for case in cases:  # warm-up (and adapter loading)
        run(case)
    rates: dict[str, list[float]] = {c: [] for c in cases}
    order = list(cases)
    for r in range(a.rounds):
        for case in order[r % len(order):] + order[: r % len(order)]:
            rates[case].append(run(case))
    med = {c: statistics.median(v) for c, v in rates.items()}
    result = {
        "command": "benchmarks/lora_overhead.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                                                           if k != "json" and v is not None),
        "machine": f"{platform.processor() or platform.machine()}, 1 pinned core",
        "date": time.strftime("%Y-%m-%d"),
        "tokens_per_s": {c: round(v, 1) for c, v in med.items()},
        "ratio_vs_base": {c: round(v / med["base"], 3) for c, v in med.items()},
    }
    print(json.dumps(result, indent=2))
    one_core.write_json(a.json, result)


if __name__ == "__main__":
    main()
