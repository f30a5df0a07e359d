"""`make demo` / `pdserve demo`: the benchmark lab in about three minutes on a small CPU machine.

Starts `standard:2` (two collocated instances, one core each, round-robin proxy) and
`disagg-write` (one prefill + one decode instance, one core each), sweeps both over a few request
rates with the seed article's SLOs (TTFT <= 1 s, per-request p99 ITL <= 50 ms), prints the
headline table and writes results.json, summary.md and the figures to `out_dir`.

The model is `dummy:qwen3-cpu-bench` (random weights, ~190 M parameters): on one core its decode
step takes ~20-35 ms and a 112-token prefill ~120 ms, the same proportions to the SLOs as the
article's setting (see benchmarks/seed_repro/README.md). The tiny default model of `generate`
would make every step ~1 ms, and nothing would interfere with anything.
"""

from __future__ import annotations

import sys

from pdserve.bench.runner import BenchConfig
from pdserve.bench.sweep import SweepConfig, default_slo_sets
from pdserve.bench.sweep_command import sweep_and_report
from pdserve.bench.workload import WorkloadConfig
from pdserve.config import DEFAULT_MODEL

DEMO_MODEL = "dummy:qwen3-cpu-bench"
DEMO_TOPOLOGIES = ("standard:2", "disagg-write")
DEMO_RATES = (1.0, 2.0, 3.0)
DEMO_PROMPTS = 30
INPUT_LEN, OUTPUT_LEN = 112, 100


def demo_config(model: str, out_dir: str) -> SweepConfig:
    workload = WorkloadConfig(num_prompts=DEMO_PROMPTS, input_len=INPUT_LEN, output_len=OUTPUT_LEN, seed=0)
    return SweepConfig(
        model=model, bench=BenchConfig(base_url="", workload=workload, timeout_s=300.0), rates=DEMO_RATES,
        topologies=DEMO_TOPOLOGIES, slo_sets=default_slo_sets(1000.0, 50.0), warmup=4,
        engine_args=("--kv-cache-memory", "0.25"), out_dir=out_dir,
    )


def run(model: str, out_dir: str) -> int:
    """Run the demo sweep on `model` (the package default model means the demo model)."""
    if model == DEFAULT_MODEL:
        model = DEMO_MODEL
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"pdserve demo: {' vs '.join(DEMO_TOPOLOGIES)} on {model}, {DEMO_PROMPTS} requests at each of "
        f"{', '.join(f'{r:g}' for r in DEMO_RATES)} req/s ({INPUT_LEN} input / {OUTPUT_LEN} output tokens)")
    code = sweep_and_report(demo_config(model, out_dir), log)
    log("Reading it: standard:2 misses the ITL SLO as soon as a prompt's prefill lands between two decode "
        "steps of a running request; disagg-write keeps decode steps clean and pays in TTFT instead. "
        f"Figures: {out_dir}/fig3_per_request.png, {out_dir}/fig4_attainment.png, {out_dir}/fig5_phases.png")
    return code
