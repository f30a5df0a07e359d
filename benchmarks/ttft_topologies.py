"""TTFT at low load: standalone vs disagg-read vs disagg-write, same model and workload, same run.

    .venv/bin/python benchmarks/ttft_topologies.py [--model dummy:qwen3-cpu-bench] [--input-len 1000]

Each topology gets one core per instance (standalone: one instance on one core; disagg: prefill on
core 0, decode on core 1), requests one at a time (max concurrency 1) so TTFT shows the path, not
queueing. Prints one JSON object: median/p90 TTFT and median ITL per topology, ratios to standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.bench.runner import BenchConfig, run_benchmark  # noqa: E402
from pdserve.bench.workload import WorkloadConfig  # noqa: E402
from pdserve.launch import Topology, TopologySpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:qwen3-cpu-bench")
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=12)
    args = ap.parse_args()
    specs = {
        "standalone": TopologySpec(kind="standard", model=args.model, instances=1, cpu_map=((1,),)),
        "disagg-read": TopologySpec(kind="disagg", model=args.model, kv_mode="read", cpu_map=((0,), (1,))),
        "disagg-write": TopologySpec(kind="disagg", model=args.model, kv_mode="write", cpu_map=((0,), (1,))),
    }
    out: dict = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "input_len": args.input_len}
    for name, spec in specs.items():
        spec = TopologySpec(**{**spec.__dict__, "run_dir": tempfile.mkdtemp(prefix=f"ttft-{name}-")})
        with Topology(spec) as topo:
            cfg = BenchConfig(
                base_url=topo.url, max_concurrency=1, warmup=2,
                workload=WorkloadConfig(num_prompts=args.num_prompts, input_len=args.input_len,
                                        output_len=args.output_len, seed=1),
            )
            m = asyncio.run(run_benchmark(cfg)).metrics
            out[name] = {"ttft_median_ms": m.ttft.median_ms, "ttft_p90_ms": m.ttft.percentile(90),
                         "itl_median_ms": m.itl.median_ms, "completed": m.completed}
    for name in ("disagg-read", "disagg-write"):
        out[name]["ttft_vs_standalone"] = out[name]["ttft_median_ms"] / out["standalone"]["ttft_median_ms"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
