"""Prefill-only requests next to streaming traffic: where a loglikelihood burst is computed changes
the decode instance's inter-token latency.

    .venv/bin/python benchmarks/prefill_only_routing.py [--rounds 2] [--json FILE]

One disaggregated topology (1 prefill on core 0 + 1 decode on core 1, WRITE, the demo's model),
started once. Each round runs the demo's streaming workload (112-token prompts, 100 tokens out,
Poisson at `--rate`) through the proxy while a burst of lm-eval style loglikelihood requests
(`echo: true`, `max_tokens: 0`, `logprobs: 1`, `--score-len`-token prompts, one every
`--score-gap` s) is sent either

* `to-decode`: straight to the decode instance, where the proxy sent such requests before it
  routed prefill-only work (they fell back to a plain request on a decode instance), or
* `proxy`: through the proxy, which now sends them whole to the prefill instance.

The two placements alternate, `--rounds` times each, on the same processes. Reported per
placement (medians over rounds): the streaming requests' p99 ITL, mean TPOT and share meeting
the demo's SLOs (TTFT <= 1 s, p99 ITL <= 50 ms), the loglikelihood requests' median latency; and
the ratios proxy / to-decode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.bench.metrics import parse_slos  # noqa: E402
from pdserve.bench.runner import BenchConfig, run_benchmark  # noqa: E402
from pdserve.bench.workload import WorkloadConfig  # noqa: E402
from pdserve.demo import DEMO_MODEL, INPUT_LEN, OUTPUT_LEN  # noqa: E402
from pdserve.launch import Topology, TopologySpec  # noqa: E402

PLACEMENTS = ("to-decode", "proxy")


async def _scores(url: str, model: str, n: int, length: int, gap_s: float, seed: int) -> list[float]:
    """`n` loglikelihood requests to `url`, one every `gap_s` s; their latencies in seconds."""
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> float:
            await asyncio.sleep(i * gap_s)
            prompt = [(seed * 7919 + i * 104729 + j * 31) % 250 + 3 for j in range(length)]
            body = {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            return time.perf_counter() - t0

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _round(stream: BenchConfig, score_url: str, a: argparse.Namespace, seed: int) -> dict[str, float]:
    bench, scores = await asyncio.gather(
        run_benchmark(stream),
        _scores(score_url, a.model, a.num_scores, a.score_len, a.score_gap, seed),
    )
    m = bench.metrics
    return {"itl_p99_ms": m.itl.percentile(99), "tpot_mean_ms": m.tpot.mean_ms, "attainment": m.attainment,
            "completed": m.completed, "score_latency_p50_s": statistics.median(scores)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--rate", type=float, default=2.0, help="streaming requests per second")
    ap.add_argument("--num-prompts", type=int, default=30, help="streaming requests per round")
    ap.add_argument("--num-scores", type=int, default=8, help="loglikelihood requests per round")
    ap.add_argument("--score-len", type=int, default=800, help="tokens per loglikelihood prompt")
    ap.add_argument("--score-gap", type=float, default=1.5, help="seconds between loglikelihood requests")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per placement")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    slos = parse_slos(["ttft:1000", "itl_p99:50"])
    out: dict = {
        "command": "benchmarks/prefill_only_routing.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json"),
        "machine": f"{platform.processor() or platform.machine()}, prefill on core 0, decode on core 1",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": [],
    }
    spec = TopologySpec(kind="disagg", model=a.model, prefill=1, decode=1, kv_mode="write", cpu_map=((0,), (1,)),
                        run_dir=tempfile.mkdtemp(prefix="prefill-only-"))
    with Topology(spec) as topo:
        decode = next(i for i in topo.instances if i.role == "decode")
        urls = {"to-decode": decode.url, "proxy": topo.url}
        warm = WorkloadConfig(num_prompts=4, input_len=INPUT_LEN, output_len=OUTPUT_LEN, seed=99)
        asyncio.run(run_benchmark(BenchConfig(base_url=topo.url, workload=warm, timeout_s=300)))
        for r in range(a.rounds):
            for placement in PLACEMENTS:
                seed = r * len(PLACEMENTS) + PLACEMENTS.index(placement)
                workload = WorkloadConfig(num_prompts=a.num_prompts, input_len=INPUT_LEN, output_len=OUTPUT_LEN,
                                          seed=seed)
                stream = BenchConfig(base_url=topo.url, request_rate=a.rate, workload=workload, slos=slos,
                                     timeout_s=300)
                rec = asyncio.run(_round(stream, urls[placement], a, seed))
                out["rounds"].append({"placement": placement, "round": r, **rec})
                print(placement, r, json.dumps(rec), flush=True)
    for placement in PLACEMENTS:
        rows = [x for x in out["rounds"] if x["placement"] == placement]
        out[placement] = {k: statistics.median(x[k] for x in rows)
                          for k in ("itl_p99_ms", "tpot_mean_ms", "attainment", "score_latency_p50_s")}
    before, after = out["to-decode"], out["proxy"]
    out["proxy_vs_to_decode"] = {k: after[k] / max(before[k], 1e-9) for k in before}
    print(json.dumps({k: out[k] for k in (*PLACEMENTS, "proxy_vs_to_decode")}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
