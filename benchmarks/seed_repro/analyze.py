"""Per-rate detail of a sweep's results.json, for the analysis in README.md.

For every series and rate: attainment of both SLOs, of TTFT alone and of ITL p99 alone, median
and p99 TTFT, the median inter-token gap (the decode step as the client sees it), the share of
all gaps above the ITL SLO, and how busy the machine was (other programs) around the run.

    .venv/bin/python benchmarks/seed_repro/analyze.py benchmarks/seed_repro/results/results.json
"""

from __future__ import annotations

import argparse
import gzip
import json

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results.json[.gz] of one or more sweeps")
    p.add_argument("--itl-slo", type=float, default=50.0)
    args = p.parse_args()
    print("| series | rate | both | TTFT only | ITL p99 only | TTFT p50 / p99 (ms) | gap p50 (ms) "
          "| gaps > SLO | busy before | load after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.results:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
            data = json.load(f)
        for s in data["series"]:
            for run in s["runs"]:
                reqs = [r for r in run["requests"] if r["success"]]
                n = len(run["requests"])
                ttft = np.array([r["ttft"] for r in reqs]) * 1e3
                gaps = np.array([g for r in reqs for g in r["itl"]]) * 1e3
                p99 = [np.percentile(np.array(r["itl"]) * 1e3, 99) if r["itl"] else 0 for r in reqs]
                ttft_ok = sum(t <= 1000 for t in ttft)
                itl_ok = sum(x <= args.itl_slo for x in p99)
                busy = run.get("cpu_busy_before")
                print(f"| {s['name']} | {run['request_rate']:g} | {run['good_requests']}/{n} | {ttft_ok}/{n} "
                      f"| {itl_ok}/{n} | {np.median(ttft):.0f} / {np.percentile(ttft, 99):.0f} "
                      f"| {np.median(gaps):.0f} | {np.mean(gaps > args.itl_slo):.1%} "
                      f"| {'n/a' if busy is None else f'{busy:.0%}'} | {run.get('load_avg_1m') or 0:.1f} |")


if __name__ == "__main__":
    main()
