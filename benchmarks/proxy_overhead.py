"""The proxy's overhead: one standalone instance reached directly and through `pdserve proxy --mode
standard`, in the same run; prints TTFT p50 of both and its difference (target <= 1 ms), and output
throughput at 32 concurrent streams of both and their ratio (target >= 0.95).

    .venv/bin/python benchmarks/proxy_overhead.py [--model dummy:qwen3-tiny] [--ttft-requests 100]

TTFT: requests one at a time (no queueing), alternating direct / proxy so that drift cancels;
TTFT is the streaming client's first token chunk after sending. Throughput: `--concurrency`
streams at once, `--rounds` rounds per side, alternating, the median round counted. By default the
instance is pinned to `--instance-cpus` (one torch thread per core) and the proxy and the client
to the other cores, as a deployment would keep the proxy off the engine's cores; `--no-pin`
shares every core (on a small machine the proxy's CPU time then slows the engine down).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import psutil

from pdserve.bench.client import Endpoint, RequestRecord, send_request
from pdserve.bench.workload import BenchRequest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Throughput:
    tokens: int
    duration_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.duration_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], port: int, log: Path, cpus: set[int] | None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[3]} exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError(f"{argv[3]} did not become healthy")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def workload(n: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(i, tuple(rng.randrange(256) for _ in range(input_len)), output_len) for i in range(n)]


def _checked(records: list[RequestRecord]) -> list[RequestRecord]:
    failed = [r.error for r in records if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    return records


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def measure(
    args: argparse.Namespace, direct: str, proxy: str, proxy_pid: int
) -> tuple[list[float], list[float], dict[str, list[Throughput]], float]:
    """(direct TTFTs, proxy TTFTs, throughput rounds per side, proxy CPU seconds per relayed token)."""
    sides = {"direct": Endpoint(direct, args.model, timeout_s=600), "proxy": Endpoint(proxy, args.model, timeout_s=600)}
    ttft: dict[str, list[float]] = {"direct": [], "proxy": []}
    rounds: dict[str, list[Throughput]] = {"direct": [], "proxy": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        short = workload(args.ttft_requests, args.ttft_input_len, 4, args.seed)
        for side in sides.values():  # warm-up: connections, first shapes
            _checked([await send_request(session, side, r) for r in short[:5]])
        for r in short:
            for name in (("direct", "proxy") if r.index % 2 == 0 else ("proxy", "direct")):
                rec = _checked([await send_request(session, sides[name], r)])[0]
                assert rec.ttft is not None
                ttft[name].append(rec.ttft)
        batch = workload(args.concurrency, args.input_len, args.output_len, args.seed + 1)
        for side in sides.values():
            _checked(await asyncio.gather(*(send_request(session, side, r) for r in batch)))  # warm-up
        proxy_cpu = 0.0
        for i in range(args.rounds):
            for name in (("direct", "proxy") if i % 2 == 0 else ("proxy", "direct")):
                c0, t0 = cpu_s(proxy_pid), time.perf_counter()
                recs = _checked(await asyncio.gather(*(send_request(session, sides[name], r) for r in batch)))
                rounds[name].append(Throughput(sum(r.output_tokens for r in recs), time.perf_counter() - t0))
                if name == "proxy":
                    proxy_cpu += cpu_s(proxy_pid) - c0
    relayed = sum(r.tokens for r in rounds["proxy"])
    return ttft["direct"], ttft["proxy"], rounds, proxy_cpu / relayed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:qwen3-tiny")
    p.add_argument("--ttft-requests", type=int, default=100, help="sequential requests per side")
    p.add_argument("--ttft-input-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--instance-cpus", default="0", help="cores of the instance (default %(default)s)")
    p.add_argument("--no-pin", action="store_true", help="instance, proxy and client share every core")
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    load0 = os.getloadavg()[0]  # other work on the machine skews both sides: shown with the figures
    all_cpus = os.sched_getaffinity(0)
    inst_cpus = {int(c) for c in args.instance_cpus.split(",")}
    rest = all_cpus - inst_cpus
    pin = not args.no_pin and bool(rest)
    tmp = Path(tempfile.gettempdir())
    inst_port, proxy_port = free_port(), free_port()
    threads = len(inst_cpus) if pin else max(1, len(all_cpus) - 1)
    serve = [sys.executable, "-m", "pdserve.cli", "serve", args.model, "--port", str(inst_port), "--no-access-log",
             "--num-kv-blocks", str(args.num_kv_blocks), "--max-num-seqs", str(max(64, args.concurrency)),
             "--threads", str(threads)]
    proxy_argv = [sys.executable, "-m", "pdserve.cli", "proxy", "--mode", "standard", "--port", str(proxy_port),
                  "--registry-port", str(free_port()), "--instance", f"http://127.0.0.1:{inst_port}",
                  "--log-level", "warning"]
    if pin:
        os.sched_setaffinity(0, rest)  # this client
    instance = start(serve, inst_port, tmp / f"pdserve-overhead-serve-{inst_port}.log", inst_cpus if pin else None)
    try:
        proxy = start(proxy_argv, proxy_port, tmp / f"pdserve-overhead-proxy-{proxy_port}.log", rest if pin else None)
        try:
            direct_ttft, proxy_ttft, rounds, cpu_per_token = asyncio.run(measure(
                args, f"http://127.0.0.1:{inst_port}/v1/completions", f"http://127.0.0.1:{proxy_port}/v1/completions",
                proxy.pid,
            ))
        finally:
            stop(proxy)
    finally:
        stop(instance)

    where = (f"instance on cpus {sorted(inst_cpus)} ({threads} thread), proxy + client on {sorted(rest)}"
             if pin else f"no pinning, {len(all_cpus)} cpus shared, instance {threads} thread(s)")
    print(f"model {args.model}; {where}; load average before/after {load0:.2f}/{os.getloadavg()[0]:.2f}")
    d50, p50 = statistics.median(direct_ttft), statistics.median(proxy_ttft)
    print(f"TTFT p50 over {args.ttft_requests} sequential requests ({args.ttft_input_len}-token prompts):")
    print(f"  direct {d50 * 1e3:8.3f} ms   proxy {p50 * 1e3:8.3f} ms   difference {(p50 - d50) * 1e3:+.3f} ms "
          f"(target <= 1 ms)")
    dt = statistics.median(r.tokens_per_s for r in rounds["direct"])
    pt = statistics.median(r.tokens_per_s for r in rounds["proxy"])
    print(f"output throughput, {args.concurrency} concurrent streams ({args.input_len} -> {args.output_len} tokens), "
          f"median of {args.rounds} rounds:")
    print(f"  direct {dt:9.1f} tok/s   proxy {pt:9.1f} tok/s   ratio {pt / dt:.3f} (target >= 0.95)")
    for name in ("direct", "proxy"):
        print(f"  {name} rounds: " + ", ".join(f"{r.tokens_per_s:.1f}" for r in rounds[name]))
    print(f"  proxy CPU: {cpu_per_token * 1e6:.1f} us per relayed token (one SSE event each)")


if __name__ == "__main__":
    main()
