"""Soak: many requests with random lengths, random client aborts and random max_tokens through the
proxy, in both disaggregated modes; samples every process's RSS and every instance's free KV
blocks over time and checks there is no growth and no leak. Not part of CI (`make soak`).

    .venv/bin/python benchmarks/soak.py [--requests 10000] [--modes write,read] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.launch import RunningTopology, Topology, TopologySpec  # noqa: E402
from tests.e2e.conftest import parse_metrics  # noqa: E402

SETTLE_LIMIT_S = 75.0  # after the load: the quarantine bound (60 s) and a margin


def sample(topo: RunningTopology) -> dict:
    row: dict = {"t": time.time()}
    for c in topo.children:
        try:
            row[f"{c.name}_rss_mb"] = psutil.Process(c.pid).memory_info().rss / 2**20
        except psutil.Error:
            row[f"{c.name}_rss_mb"] = None
    for c in topo.instances:
        try:
            m = parse_metrics(httpx.get(f"{c.url}/metrics", timeout=5).text)
            row[f"{c.name}_free"] = m["pdserve_kv_blocks_free"]
            row[f"{c.name}_total"] = m["pdserve_kv_blocks_total"]
        except httpx.HTTPError:
            row[f"{c.name}_free"] = None
    return row


async def drive(url: str, n: int, concurrency: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    counts = {"ok": 0, "aborted": 0, "error": 0}
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        prompt = [rng.randrange(250) for _ in range(rng.randint(1, 400))]
        body = {"prompt": prompt, "max_tokens": rng.randint(1, 64), "temperature": 0, "ignore_eos": True,
                "stream": rng.random() < 0.7}
        abort_after = rng.random() * 0.5 if rng.random() < 0.2 else None
        async with sem:
            try:
                coro = client.post(f"{url}/v1/completions", json=body)
                r = await (asyncio.wait_for(coro, abort_after) if abort_after else coro)
                counts["ok" if r.status_code == 200 else "error"] += 1
            except (asyncio.TimeoutError, httpx.TimeoutException):
                counts["aborted"] += 1
            except httpx.HTTPError:
                counts["error"] += 1

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return counts


def soak(mode: str, n: int, concurrency: int, model: str, out: Path) -> dict:
    spec = TopologySpec(kind="disagg", model=model, kv_mode=mode, cpu_map=((0,), (1,)), run_dir=str(out / mode),
                        engine_args=("--num-kv-blocks", "512", "--kv-lease-seconds", "10"))
    samples: list[dict] = []
    stop = threading.Event()
    with Topology(spec) as topo:
        def sampler() -> None:
            while not stop.is_set():
                samples.append(sample(topo))
                stop.wait(2.0)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        t0 = time.time()
        counts = asyncio.run(drive(topo.url, n, concurrency, seed=1))
        elapsed = time.time() - t0
        time.sleep(12)  # leases expire, aborts settle
        stop.set()
        th.join()
        final = sample(topo)
        # Blocks still held then wait for a quarantine (a WRITE transfer cut by a client abort) to
        # settle: bounded by the transfer deadline + --kv-transfer-timeout (60 s by default).
        settled_after = 12.0
        while _held(final) and settled_after < SETTLE_LIMIT_S:
            time.sleep(1.0)
            settled_after += 1.0
            final = sample(topo)
    samples.append(final)
    warm = samples[min(len(samples) - 1, max(1, len(samples) // 10))]
    growth = {k: final[k] - warm[k] for k in final if k.endswith("_rss_mb") and final[k] and warm.get(k)}
    leaks = {c: final[f"{c}_total"] - final[f"{c}_free"] for c in ("prefill-0", "decode-0") if f"{c}_free" in final}
    return {"mode": mode, "requests": n, "elapsed_s": elapsed, "counts": counts,
            "rss_growth_after_warmup_mb": growth, "blocks_not_free_at_end": leaks,
            "all_blocks_free_after_s": None if _held(final) else settled_after, "samples": samples}


def _held(row: dict) -> bool:
    return any(row.get(f"{c}_free") != row.get(f"{c}_total") for c in ("prefill-0", "decode-0"))


def plot(results: list[dict], path: Path) -> None:
    """RSS of every process and free KV blocks of every instance over time, one column per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 6), squeeze=False, sharex="col")
    for col, r in enumerate(results):
        rows = r["samples"]
        t = [row["t"] - rows[0]["t"] for row in rows]
        for key in sorted(k for k in rows[-1] if k.endswith("_rss_mb")):
            axes[0][col].plot(t, [row.get(key) for row in rows], label=key.removesuffix("_rss_mb"))
        for key in sorted(k for k in rows[-1] if k.endswith("_free")):
            axes[1][col].plot(t, [row.get(key) for row in rows], label=key.removesuffix("_free"))
        axes[0][col].set_title(f"{r['mode']} mode: {r['requests']} requests")
        axes[0][col].set_ylabel("RSS (MiB)")
        axes[1][col].set_ylabel("free KV blocks")
        axes[1][col].set_xlabel("seconds")
        for ax in axes[:, col]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--modes", default="write,read")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--model", default="dummy:qwen3-tiny")
    ap.add_argument("--out", default="runs/soak")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [soak(m, args.requests, args.concurrency, args.model, out) for m in args.modes.split(",")]
    (out / "soak.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "soak.png")
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "samples"}))


if __name__ == "__main__":
    main()
