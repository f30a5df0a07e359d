"""KV transfer benchmarks (run: .venv/bin/python benchmarks/kv_transfer.py [--quick]).

1. Bandwidth: shm, tcp and (if installed) nixl READ / WRITE of N blocks of the qwen3-cpu-bench KV
   layout, against a plain memcpy of the same bytes in the same run (contiguous and scattered
   block ids), and of one block (READ: every layer of it; WRITE: one layer), with ratios to shm.
2. Handoff latency: from the prefill's last layer (write mode: last layer of the last chunk; read
   mode: the prefill's final output) to the decode request being ready, in-process engines on
   real sockets, the test harness playing the proxy; shm (auto) and nixl.
Prints one JSON object (`--out FILE` also writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pdserve.config import CacheConfig, EngineConfig, KVTransferConfig, SchedulerConfig  # noqa: E402
from pdserve.engine.async_engine import AsyncEngine  # noqa: E402
from pdserve.engine.engine import LLMEngine  # noqa: E402
from pdserve.engine.kv_cache import KVCache, KVLayout  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.kv.messages import ShmDescriptor  # noqa: E402
from pdserve.kv.transports.shm import ShmTransport  # noqa: E402
from pdserve.kv.transports.tcp import TcpServer, TcpTransport  # noqa: E402


def timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


HAVE_NIXL = importlib.util.find_spec("nixl_cu12") is not None or importlib.util.find_spec("nixl") is not None


def bandwidth(num_blocks: int, n: int, repeats: int) -> dict:
    layout = KVLayout(4, num_blocks, 16, 2, 128, torch.bfloat16)  # qwen3-cpu-bench's KV layout
    a = KVCache(layout, torch.device("cpu"), shared=True)
    b = KVCache(layout, torch.device("cpu"), shared=True)
    a.tensor.normal_()
    nbytes = n * layout.num_layers * layout.block_bytes
    src_flat = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst_flat = torch.empty_like(src_flat)
    memcpy = timeit(lambda: dst_flat.copy_(src_flat), repeats)
    shm = ShmTransport(b.tensor, ShmDescriptor(a.shm_name, layout.total_bytes, ""), layout.shape)
    contiguous = list(range(n))
    rng = random.Random(0)
    scattered_src = rng.sample(range(num_blocks), n)
    scattered_dst = rng.sample(range(num_blocks), n)
    server = TcpServer(a.tensor, "127.0.0.1")
    rid = "bench"  # the TCP server serves only blocks granted to a request
    server.grants.grant(rid, sorted(set(contiguous) | set(scattered_src) | set(scattered_dst) | {7, 9}))
    tcp = TcpTransport(b.tensor, "127.0.0.1", server.port)
    transports = {"shm": shm, "tcp": tcp}
    agents = []
    if HAVE_NIXL:
        from pdserve.kv.transports.nixl import NixlAgent, NixlTransport

        agents = [NixlAgent("bench-a", a.tensor, "127.0.0.1"), NixlAgent("bench-b", b.tensor, "127.0.0.1")]
        transports["nixl"] = NixlTransport(agents[1], b.tensor, agents[0].descriptor(), layout.shape, 30.0)
    scattered = nbytes / timeit(lambda: shm.read(scattered_src, scattered_dst, request_id=rid), repeats) / 1e9
    assert torch.equal(b.tensor[:, scattered_dst], a.tensor[:, scattered_src]), "shm read copied the wrong blocks"
    res = {
        "bytes": nbytes,
        "memcpy_GBps": nbytes / memcpy / 1e9,
        "shm_read_contiguous_GBps":
            nbytes / timeit(lambda: shm.read(contiguous, contiguous, request_id=rid), repeats) / 1e9,
        "shm_read_scattered_GBps": scattered,
        "shm_write_layers_contiguous_GBps": nbytes / timeit(
            lambda: [shm.write_layer(layer, contiguous, contiguous, request_id=rid)
                     for layer in range(layout.num_layers)], repeats
        ) / 1e9,
        "tcp_read_contiguous_GBps":
            nbytes / timeit(lambda: tcp.read(contiguous, contiguous, request_id=rid), repeats) / 1e9,
    }
    layer_bytes = layout.block_bytes  # one block of one layer
    for name, t in transports.items():
        if name != "shm":
            if name != "tcp":
                res[f"{name}_read_contiguous_GBps"] = nbytes / timeit(
                    lambda t=t: t.read(contiguous, contiguous, request_id=rid), repeats) / 1e9
            res[f"{name}_read_scattered_GBps"] = nbytes / timeit(
                lambda t=t: t.read(scattered_src, scattered_dst, request_id=rid), repeats) / 1e9
            res[f"{name}_write_layers_contiguous_GBps"] = nbytes / timeit(
                lambda t=t: [t.write_layer(layer, contiguous, contiguous, request_id=rid)
                             for layer in range(layout.num_layers)], repeats) / 1e9
        # One block: READ moves every layer of it, WRITE one layer (what a push of a 16-token chunk moves).
        one_read = timeit(lambda t=t: t.read([7], [9], request_id=rid), repeats * 20)
        one_write = timeit(lambda t=t: t.write_layer(1, [7], [9], request_id=rid), repeats * 20)
        res[f"{name}_read_1block_us"] = one_read * 1e6
        res[f"{name}_read_1block_GBps"] = layout.num_layers * layer_bytes / one_read / 1e9
        res[f"{name}_write_1block_layer_us"] = one_write * 1e6
        res[f"{name}_write_1block_layer_GBps"] = layer_bytes / one_write / 1e9
    if "nixl" in transports:
        b.tensor.zero_()
        transports["nixl"].read(scattered_src, scattered_dst, request_id=rid)
        assert torch.equal(b.tensor[:, scattered_dst], a.tensor[:, scattered_src]), "nixl read copied the wrong blocks"
    for k in list(res):
        if k.endswith("_GBps") and k != "memcpy_GBps":
            res[k.replace("_GBps", "_vs_memcpy")] = res[k] / res["memcpy_GBps"]
            shm_key = "shm_" + k.split("_", 1)[1]
            if not k.startswith("shm_") and shm_key in res:
                res[k.replace("_GBps", "_vs_shm")] = res[k] / res[shm_key]
    for k in [k for k in res if k.endswith("_us") and not k.startswith("shm_")]:
        res[k + "_vs_shm"] = res[k] / res["shm_" + k.split("_", 1)[1]]  # a time: > 1 is slower
    if "nixl" in transports:
        transports["nixl"].close()
    for agent in agents:
        agent.close()
    tcp.close()
    server.close()
    shm.close()
    a.close()
    b.close()
    return res


def _engine(role: str, mode: str, model: str, transport: str = "auto") -> AsyncEngine:
    return AsyncEngine(LLMEngine(EngineConfig(
        model=model, threads=1, cache=CacheConfig(num_kv_blocks=256, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=512),
        kv_transfer=KVTransferConfig(role=role, kv_mode=mode, kv_transport=transport),  # type: ignore[arg-type]
    )))


def handoff(mode: str, model: str, prompt_len: int, repeats: int, transport: str = "auto") -> dict:
    """Seconds from the prefill's last KV layer (or final output) to the decode request being ready."""
    p, d = _engine("prefill", mode, model, transport), _engine("decode", mode, model, transport)
    marks: dict[str, float] = {}
    pc, dc = p.engine.connector, d.engine.connector
    last_layer = p.engine.model_config.num_hidden_layers - 1
    orig_hook, orig_poll = pc.on_layer_done, dc.poll

    def hook(layer: int) -> None:
        orig_hook(layer)
        if layer == last_layer and pc._step_pushes:
            marks["last_layer"] = time.perf_counter()

    def poll():
        ready, failed = orig_poll()
        if ready:
            marks.setdefault("ready", time.perf_counter())
        return ready, failed

    pc.on_layer_done = hook
    p.engine.runner.layer_hook = hook
    dc.poll = poll
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    async def go(i: int) -> float:
        marks.clear()
        prompt = [(i * 7 + j) % 250 for j in range(prompt_len)]
        rid = f"h{i}"
        if mode == "read":
            outs = [o async for o in p.generate(rid, prompt, one, {"do_remote_decode": True})]
            marks["last_layer"] = time.perf_counter()  # the prefill's final output: KV complete
            async for _ in d.generate(rid, prompt, one, outs[-1].kv_transfer_params):
                pass
        else:
            params = {"do_remote_prefill": True, "transfer_mode": "WRITE", "remote_host": pc.host,
                      "remote_handshake_port": pc.handshake_port, "remote_notify_port": pc.notify_port}

            async def drain(it):
                async for _ in it:
                    pass

            await asyncio.gather(drain(p.generate(rid, prompt, one, {"do_remote_decode": True})),
                                 drain(d.generate(rid, prompt, one, params)))
        return marks["ready"] - marks["last_layer"]

    async def main() -> list[float]:
        return [await go(i) for i in range(repeats + 1)][1:]

    try:
        times = asyncio.run(main())
    finally:
        for e in (p, d):
            e.shutdown()
            e.engine.close()
    return {"median_ms": statistics.median(times) * 1000, "min_ms": min(times) * 1000, "n": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="dummy:qwen3-cpu-bench")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the copies (1: no OpenMP wake-ups, steady on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7
    out = {
        "machine": os.uname().nodename,
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "bandwidth": bandwidth(2048, 1024 if not args.quick else 256, reps),
        "handoff_read": handoff("read", args.model, args.prompt_len, reps),
        "handoff_write": handoff("write", args.model, args.prompt_len, reps),
    }
    if HAVE_NIXL:
        out["handoff_read_nixl"] = handoff("read", args.model, args.prompt_len, reps, "nixl")
        out["handoff_write_nixl"] = handoff("write", args.model, args.prompt_len, reps, "nixl")
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
