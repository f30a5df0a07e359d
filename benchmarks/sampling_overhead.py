"""What logprobs, penalties, prompt logprobs and structured outputs cost: offline decode throughput of one engine with
each option against plain sampling, in the same run, as ratios.

    .venv/bin/python benchmarks/sampling_overhead.py [--model dummy:qwen3-cpu-bench] [--rounds 3]

One engine (pinned to --cpu, one thread), `--batch` prompts of `--input-len` random tokens,
`--output-len` tokens each (ignore_eos), temperature 1 with a seed. Each round runs every variant
once, in a rotated order so that drift cancels; the median round's tokens/s per variant is
reported, with its ratio to plain sampling. Timing starts after a warm-up generate.
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
from pdserve.engine.sampling_params import StructuredOutputs

VARIANTS: dict[str, dict[str, object]] = {
    "plain": {},
    "logprobs=5": {"logprobs": 5},
    "logprobs=20": {"logprobs": 20},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    "prompt_logprobs=1": {"prompt_logprobs": 1},
    # Constraints no request can complete within --output-len tokens (a token is at most a few
    # characters), so every variant generates the same number of tokens and each pays for its masks.
    "regex [a-z ,.]{400}": {"structured_outputs": StructuredOutputs(regex="[a-z ,.]{400}")},
    "json string, 400+ chars": {"structured_outputs": StructuredOutputs(json=json.dumps(
        {"type": "string", "minLength": 400}))},
}


def main() -> None:
    a = one_core.parser(__doc__).parse_args()
    one_core.pin(a.cpu)
    # No prefix caching: every variant computes the same prompts, so none may find them cached.
    llm = LLM(a.model, max_model_len=a.input_len + a.output_len + 16, max_num_seqs=a.batch,
              enable_prefix_caching=False)
    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (a.input_len,), generator=g).tolist() for _ in range(a.batch)]

    def run(extra: dict[str, object]) -> float:
        sp = SamplingParams(max_tokens=a.output_len, temperature=1.0, seed=1, ignore_eos=True, **extra)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        seconds = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs) / seconds

    run({})  # warm-up
    names = list(VARIANTS)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            rates[n].append(run(VARIANTS[n]))
    med = {n: statistics.median(v) for n, v in rates.items()}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json")
    res = {
        "command": f"benchmarks/sampling_overhead.py {flags}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "tokens_per_s": med,
        "vs_plain": {n: med[n] / med["plain"] for n in names},
        "rounds": rates,
    }
    print(json.dumps(res, indent=2))
    one_core.write_json(a.json, res)
    llm.close()


if __name__ == "__main__":
    main()
