"""GPTQ / AWQ 4-bit checkpoints against the same model in bf16, in one run, as ratios.

    .venv/bin/python benchmarks/int4_weights.py [--model dummy:qwen3-cpu-bench] [--rounds 3]
        [--json benchmarks/results/int4_weights_2026-11-27.json]

The model is exported (round-to-nearest, group size 128) as AWQ and as GPTQ, then each of the three
is served by an engine as `pdserve serve` would (bf16; the 4-bit layers on torch's int4 kernels,
int4_linear.py). Figures:
- weight bytes: the loaded model's tensors (4-bit layers: their int4 pack, scales and zeros);
- decode: `--batch-sizes` requests of `--context` random tokens prefilled, then `--output-len`
  decode steps at that batch (median step time);
- prefill: one prompt of `--input-len` tokens (seconds to its first token).
Medians over rounds (the models' order rotated each round), reported as 4-bit / bf16. One thread
pinned to --cpu.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import one_core
import torch

from pdserve import LLM
from pdserve.model.export import export_model
from pdserve.model.int4_linear import Int4Linear
from pdserve.model.loader import load_model

KINDS = ("bf16", "awq", "gptq")


def weight_bytes(model: str) -> int:
    """Bytes of the loaded model's weights (tied ones once; a 4-bit layer's pack, scales and zeros)."""
    module = load_model(model, torch.bfloat16, "cpu").module
    seen: set[int] = set()
    total = 0
    tensors = list(module.parameters())
    for m in module.modules():
        if isinstance(m, Int4Linear):
            tensors += [t for t in (m.packed, m.scales_and_zeros, m.perm, m.bias) if t is not None]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total



def main() -> None:
    p = one_core.parser(__doc__, batch=None, input_len=1000, output_len=16, rounds=3)
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--context", type=int, default=1000, help="prompt tokens of each decoding request")
    p.add_argument("--group-size", type=int, default=128)
    a = p.parse_args()
    one_core.pin(a.cpu)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="int4-bench-"))
    paths = {"bf16": a.model}
    for q in KINDS[1:]:
        paths[q] = str(export_model(a.model, tmp / q, quantization=q, group_size=a.group_size))
    wbytes = {k: weight_bytes(path) for k, path in paths.items()}
    max_len = max(a.input_len, a.context) + a.output_len + 16
    llms = {k: LLM(path, dtype="bfloat16", max_model_len=max_len, max_num_seqs=max(batches), kv_cache_gib=0.25,
                   enable_prefix_caching=False) for k, path in paths.items()}
    vocab = llms["bf16"].engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    for llm in llms.values():  # warm-up
        one_core.prefill_then_decode(llm, [rand(64)], 2, "warm")
    prefill: dict[str, list[float]] = {k: [] for k in KINDS}
    step: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in KINDS}
    for r in range(a.rounds):
        order = KINDS[r % 3:] + KINDS[: r % 3]
        prompt = rand(a.input_len)
        for k in order:
            prefill[k].append(one_core.prefill_then_decode(llms[k], [prompt], 0, f"p{r}")[0])
        for b in batches:
            prompts = [rand(a.context) for _ in range(b)]
            for k in order:
                step[k][b].append(one_core.prefill_then_decode(llms[k], prompts, a.output_len, f"d{r}-{b}")[1])  # type: ignore[arg-type]
    med_pre = {k: statistics.median(v) for k, v in prefill.items()}
    med_step = {k: {b: statistics.median(v) for b, v in s.items()} for k, s in step.items()}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json")
    res = {
        "command": f"benchmarks/int4_weights.py {flags}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "weight_bytes": wbytes,
        "weight_bytes_ratio_over_bf16": {k: wbytes[k] / wbytes["bf16"] for k in KINDS[1:]},
        "prefill_seconds": med_pre,
        "prefill_ratio_over_bf16": {k: med_pre[k] / med_pre["bf16"] for k in KINDS[1:]},
        "decode_step_seconds": med_step,
        "decode_step_ratio_over_bf16": {
            k: {b: med_step[k][b] / med_step["bf16"][b] for b in batches} for k in KINDS[1:]
        },
        "rounds": {"prefill_s": prefill, "decode_step_s": step},
    }
    print(json.dumps(res, indent=2))
    one_core.write_json(a.json, res)
    for llm in llms.values():
        llm.close()


if __name__ == "__main__":
    main()
