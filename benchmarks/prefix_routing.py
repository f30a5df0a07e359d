"""Cache-aware routing: `pdserve proxy --routing prefix` against round-robin, same instances, same
workload, same run.

    .venv/bin/python benchmarks/prefix_routing.py [--num-prefixes 8] [--prefix-len 512] [--num-kv-blocks 320]

Two standalone instances (core 0, core 1) behind a proxy; requests draw one of `--num-prefixes`
shared prefixes (system prompts) plus `--input-len` tokens of their own, at `--rate` req/s. The KV
cache of one instance (`--num-kv-blocks`) holds about half of the prefixes next to the running
requests: round-robin makes each instance keep all of them (evicting each other), prefix routing
gives each instance its own half. Reported per policy: the instances' prefix-cache hit rate (from
their /metrics), TTFT p50/p99, and the ratios prefix / round-robin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.bench.runner import BenchConfig, run_benchmark  # noqa: E402
from pdserve.bench.workload import WorkloadConfig  # noqa: E402
from pdserve.launch import Topology, TopologySpec  # noqa: E402

POLICIES = ("round-robin", "prefix")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:qwen3-cpu-bench")
    ap.add_argument("--num-prefixes", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--num-kv-blocks", type=int, default=320)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    workload = WorkloadConfig(num_prompts=a.num_prompts, input_len=a.input_len, output_len=a.output_len,
                              prefix_len=a.prefix_len, num_prefixes=a.num_prefixes, seed=1)
    out: dict = {
        "command": "benchmarks/prefix_routing.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json"),
        "machine": f"{platform.processor() or platform.machine()}, 2 instances on cores 0 and 1",
        "date": time.strftime("%Y-%m-%d"),
    }
    for policy in POLICIES:
        spec = TopologySpec(kind="standard", model=a.model, instances=2, cpu_map=((0,), (1,)),
                            engine_args=("--num-kv-blocks", str(a.num_kv_blocks)),
                            proxy_args=("--routing", policy), run_dir=tempfile.mkdtemp(prefix=f"routing-{policy}-"))
        with Topology(spec) as topo:
            cfg = BenchConfig(base_url=topo.url, request_rate=a.rate, workload=workload, timeout_s=300)
            result = asyncio.run(run_benchmark(cfg))
            queries = hits = 0.0
            for inst in topo.instances:
                text = httpx.get(inst.url + "/metrics", timeout=10).text
                queries += _sample(text, "pdserve_prefix_cache_queries_total")
                hits += _sample(text, "pdserve_prefix_cache_hits_total")
        m = result.metrics
        out[policy] = {"hit_rate": hits / max(queries, 1.0), "ttft_p50_ms": m.ttft.median_ms,
                       "ttft_p99_ms": m.ttft.percentile(99), "completed": m.completed,
                       "request_throughput": m.request_throughput}
    rr, px = out["round-robin"], out["prefix"]
    out["prefix_vs_round_robin"] = {"hit_rate": px["hit_rate"] / max(rr["hit_rate"], 1e-9),
                                    "ttft_p50": px["ttft_p50_ms"] / rr["ttft_p50_ms"],
                                    "ttft_p99": px["ttft_p99_ms"] / rr["ttft_p99_ms"]}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


def _sample(text: str, name: str) -> float:
    """One unlabelled sample of a Prometheus text page."""
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


if __name__ == "__main__":
    main()
