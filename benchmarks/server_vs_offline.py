"""The HTTP server's overhead: one workload through the offline `pdserve.LLM` and through
`pdserve serve` (all requests at once, streaming), in the same run; prints TTFT p50, output
tokens/s and the server/offline ratios.

    .venv/bin/python benchmarks/server_vs_offline.py [--model dummy:qwen3-tiny] [--num-prompts 32] [--out F.json]

Each side first runs the whole workload once untimed (first calls of each shape are slow), then
`--repeats` timed runs of which the fastest is reported (robust to other load on the machine).
Offline TTFT is measured by stepping the LLM's engine (what `LLM.generate` does) and noting
when each request's first token comes out; server TTFT is the streaming client's first token
chunk after sending; its ITL is the gap between token chunks as the client sees them (a chunk
that carries several tokens counts once, as in `vllm bench serve`). Both use the same engine
settings and thread count. On a small machine the client process competes with the server for
cores: that cost is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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

from pdserve import LLM, SamplingParams
from pdserve.bench.client import Endpoint, send_request
from pdserve.bench.workload import BenchRequest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Result:
    name: str
    ttft_p50_s: float
    output_tokens: int
    duration_s: float
    itl_p50_s: float | None = None  # the server's, as its client sees it
    itl_p99_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s


def make_workload(n: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(i, tuple(rng.randrange(256) for _ in range(input_len)), output_len) for i in range(n)]


def params(output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=output_len, min_tokens=output_len, ignore_eos=True, temperature=0.0)


def step_offline(llm: LLM, work: list[BenchRequest], sp: SamplingParams, tag: str) -> Result:
    """Add every request, then step the engine to the end, noting each request's first token."""
    engine = llm.engine
    t0 = time.perf_counter()
    for req in work:
        engine.add_request(f"{tag}-{req.index}", list(req.prompt_token_ids), sp)
    first: dict[str, float] = {}
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - t0
            tokens += len(out.new_token_ids)
    return Result("offline (engine steps)", statistics.median(first.values()), tokens, time.perf_counter() - t0)


def run_offline(args: argparse.Namespace, work: list[BenchRequest]) -> tuple[Result, float]:
    """Best of `--repeats` step-loop runs, and the best LLM.generate throughput."""
    llm = LLM(args.model, threads=args.threads, num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
              enable_prefix_caching=False)  # the repeats reuse the prompts
    sp = params(args.output_len)
    prompts = [list(r.prompt_token_ids) for r in work]
    llm.generate(prompts, sp)  # warm-up: same shapes
    best = min((step_offline(llm, work, sp, f"r{i}") for i in range(args.repeats)), key=lambda r: r.duration_s)
    generate_tps = 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        tps = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
        generate_tps = max(generate_tps, tps)
    llm.close()
    return best, generate_tps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "serve",
        args.model,
        "--port",
        str(port),
        "--no-access-log",
        "--num-kv-blocks",
        str(args.num_kv_blocks),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--no-enable-prefix-caching",  # as the offline run: the repeats reuse the prompts
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server did not become healthy")


async def drive_server(url: str, model: str, work: list[BenchRequest], repeats: int = 1) -> Result:
    """Warm up, then the best (shortest) of `repeats` runs of the whole workload at once."""
    endpoint = Endpoint(url=url, model=model, timeout_s=600)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(send_request(session, endpoint, r) for r in work))  # warm-up: same shapes
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            records = await asyncio.gather(*(send_request(session, endpoint, r) for r in work))
            runs.append((time.perf_counter() - t0, records))
    duration, records = min(runs, key=lambda run: run[0])
    failed = [r.error for r in records if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    ttfts = [r.ttft for r in records if r.ttft is not None]
    itls = sorted(x for r in records for x in r.itl)
    return Result("server (HTTP, streaming)", statistics.median(ttfts), sum(r.output_tokens for r in records), duration,
                  itls[len(itls) // 2], itls[min(len(itls) - 1, int(0.99 * len(itls)))])


def run_server(args: argparse.Namespace, work: list[BenchRequest]) -> Result:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"pdserve-bench-{port}.log"
    proc = start_server(args, port, log)
    try:
        return asyncio.run(drive_server(f"http://127.0.0.1:{port}/v1/completions", args.model, work, args.repeats))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:qwen3-tiny")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the fastest is reported")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args()
    work = make_workload(args.num_prompts, args.input_len, args.output_len, args.seed)
    offline, generate_tps = run_offline(args, work)
    server = run_server(args, work)
    print(
        f"model {args.model}: {args.num_prompts} prompts x {args.input_len} tokens -> {args.output_len} tokens, "
        f"all at once, threads={args.threads or 'default'}, cpus={os.cpu_count()}"
    )
    print(f"{'':26} {'TTFT p50 (ms)':>14} {'output tok/s':>13} {'duration (s)':>13}")
    for r in (offline, server):
        print(f"{r.name:26} {r.ttft_p50_s * 1e3:14.1f} {r.tokens_per_s:13.1f} {r.duration_s:13.2f}")
    print(f"{'offline (LLM.generate)':26} {'':>14} {generate_tps:13.1f}")
    if server.itl_p50_s is not None and server.itl_p99_s is not None:
        print(f"server ITL (client-side, per token chunk): p50 {server.itl_p50_s * 1e3:.2f} ms, "
              f"p99 {server.itl_p99_s * 1e3:.2f} ms")
    ttft_ratio, tps_ratio = server.ttft_p50_s / offline.ttft_p50_s, server.tokens_per_s / offline.tokens_per_s
    print(f"server/offline: TTFT p50 x{ttft_ratio:.2f}, throughput x{tps_ratio:.2f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
            "offline": {**vars(offline), "tokens_per_s": offline.tokens_per_s, "generate_tokens_per_s": generate_tps},
            "server": {**vars(server), "tokens_per_s": server.tokens_per_s},
            "ratios": {"ttft_p50": ttft_ratio, "throughput": tps_ratio},
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
