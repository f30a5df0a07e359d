"""Single-core hardware limits of this machine: streaming read and copy bandwidth, bf16 GEMM rate.

    .venv/bin/python benchmarks/roofline.py [--core 1] [--repeats 5] [--gib 1] [--json]

Everything runs on ONE pinned core (os.sched_setaffinity + torch.set_num_threads(1)): these are the
limits a one-thread engine on that core can reach, and what benchmarks/offline_throughput.py
compares a decode step (weight bytes / read bandwidth) and a prefill (FLOPs / GEMM rate) against.

Read bandwidth is measured three ways over a buffer much larger than the last-level cache:
`torch.sum` of a float32 tensor, `torch.sum` of a bfloat16 tensor (its bf16->fp32 widening costs
compute, so it can read below the memory limit) and `numpy.sum` of the float32 buffer (numpy's
pairwise summation is compute-bound on one core). The figure used as *the* read bandwidth
(`read_gbs`) is the highest of the three medians, i.e. the fastest streaming read a single core was
seen to sustain; the others are reported beside it. Copy bandwidth counts bytes read + bytes
written. GEMM rates are torch.matmul in bf16 (a large square-ish shape) and F.linear with a model's
prefill shapes (x [T, in] by weight [out, in], as nn.Linear does). With a model's shapes it also
times one decode step's linears (each layer its own weights, M = 16 rows, weights prepacked for
oneDNN): at batch 16 a bf16 decode step on a core without AMX is bounded by this compute, not by
reading the weights.

The machine is shared: each figure is the median of `repeats` timed runs after one warm-up (the
best run is reported beside it), timed on the process's CPU time (time.process_time: one pinned
thread, so the time it actually held its core; wall-clock medians of the main figures are
reported as *_wall).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Timing:
    median_s: float  # on CLOCK
    best_s: float
    runs_s: list[float]
    wall_median_s: float


# The clock every figure is taken on: the process's CPU time (one pinned thread, so the time it
# was on its core). The machine is shared: wall time would count the time other jobs held the core.
CLOCK = time.process_time


@dataclass
class Roofline:
    core: int
    cpu_model: str
    torch_version: str
    buffer_bytes: int
    repeats: int
    read_gbs_torch_f32: float  # median
    read_gbs_torch_bf16: float
    read_gbs_numpy_f32: float
    read_gbs: float  # the one used: max of the three medians
    read_method: str
    read_gbs_best: float  # best single run of the chosen method
    read_gbs_wall: float  # the chosen method's median on the wall clock
    copy_gbs: float  # (read + write bytes) / s, median
    gemm_shape: tuple[int, int, int]  # M, K, N
    gemm_bf16_gflops: float  # median
    gemm_bf16_gflops_best: float
    gemm_bf16_gflops_wall: float
    # name -> {"shape": [M, K, N], "gflops": median} for a model's prefill linears (if asked).
    prefill_shapes: dict[str, dict] = field(default_factory=dict)
    prefill_shapes_gflops: float | None = None  # FLOP-weighted rate over those shapes (one layer)
    # A decode step's linears (every layer's own weights, so nothing stays in cache) at M rows,
    # with weights prepacked for oneDNN (the fastest bf16 linear torch has here): seconds per step.
    decode_linears_rows: int | None = None
    decode_linears_layers: int | None = None
    decode_linears_s: float | None = None
    decode_linears_gflops: float | None = None
    decode_linears_gbs: float | None = None  # weight bytes / time

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def pin_to_core(core: int) -> None:
    """Pin this process to one core and one torch thread."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def cpu_model_name() -> str:
    try:
        out = os.popen("lscpu").read()
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def time_it(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    runs, walls = [], []
    for _ in range(repeats):
        w0, t0 = time.perf_counter(), CLOCK()
        fn()
        runs.append(CLOCK() - t0)
        walls.append(time.perf_counter() - w0)
    return Timing(statistics.median(runs), min(runs), runs, statistics.median(walls))


def read_bandwidth(nbytes: int, repeats: int) -> dict[str, Timing]:
    """Time one full streaming read of an nbytes buffer, three ways (see the module doc)."""
    x32 = torch.ones(nbytes // 4, dtype=torch.float32)
    out = {"torch_f32": time_it(lambda: x32.sum(), repeats)}
    a = x32.numpy()
    out["numpy_f32"] = time_it(lambda: np.sum(a), repeats)
    xb = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    out["torch_bf16"] = time_it(lambda: xb.sum(), repeats)
    return out


def copy_bandwidth(nbytes: int, repeats: int) -> Timing:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return time_it(lambda: dst.copy_(src), repeats)


def gemm_rate(m: int, k: int, n: int, repeats: int) -> Timing:
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(k, n, dtype=torch.bfloat16)
    return time_it(lambda: torch.matmul(a, b), repeats, warmup=2)


def linear_rate(t: int, k: int, n: int, repeats: int) -> Timing:
    x = torch.randn(t, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    return time_it(lambda: F.linear(x, w), repeats, warmup=2)


def decode_linears(shapes: dict[str, tuple[int, int]], layers: int, rows: int, repeats: int) -> tuple[Timing, int]:
    """Every linear of `layers` layers once on [rows, in] (one decode step's linears); (timing, weight bytes)."""
    packed, xs = [], {}
    nbytes = 0
    for _ in range(layers):
        for fin, fout in shapes.values():
            w = torch.randn(fout, fin, dtype=torch.bfloat16)
            nbytes += w.numel() * w.element_size()
            packed.append((fin, torch.ops.mkldnn._reorder_linear_weight(w, rows)))
            xs.setdefault(fin, torch.randn(rows, fin, dtype=torch.bfloat16))

    def step() -> None:
        for fin, pw in packed:
            torch.ops.mkldnn._linear_pointwise(xs[fin], pw, None, "none", [], "")

    return time_it(step, repeats, warmup=2), nbytes


def model_prefill_shapes(hidden: int, intermediate: int, q_dim: int, kv_dim: int) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one dense Qwen3 layer."""
    return {
        "q_proj": (hidden, q_dim),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (q_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def measure(
    core: int = 1,
    repeats: int = 5,
    buffer_gib: float = 1.0,
    gemm_shape: tuple[int, int, int] = (2048, 2048, 6144),
    prefill_tokens: int | None = None,
    model_shapes: dict[str, tuple[int, int]] | None = None,
    decode_rows: int = 16,
    decode_layers: int = 4,
) -> Roofline:
    """Pin to `core`, measure, return a Roofline. `model_shapes` (name -> (in, out)) with
    `prefill_tokens` also times F.linear on [prefill_tokens, in] for each."""
    pin_to_core(core)
    nbytes = int(buffer_gib * (1 << 30))
    with torch.inference_mode():
        reads = read_bandwidth(nbytes, repeats)
        gbs = {name: nbytes / t.median_s / 1e9 for name, t in reads.items()}
        method = max(gbs, key=gbs.__getitem__)
        cp = copy_bandwidth(nbytes, repeats)
        m, k, n = gemm_shape
        g = gemm_rate(m, k, n, repeats)
        flops = 2 * m * k * n
        shapes: dict[str, dict] = {}
        dec: Timing | None = None
        dec_bytes = dec_flops = 0
        total_flops = total_s = 0.0
        if model_shapes and prefill_tokens:
            for name, (fin, fout) in model_shapes.items():
                t = linear_rate(prefill_tokens, fin, fout, max(3, repeats // 2))
                f = 2 * prefill_tokens * fin * fout
                shapes[name] = {"shape": [prefill_tokens, fin, fout], "gflops": f / t.median_s / 1e9}
                total_flops += f
                total_s += t.median_s
            dec, dec_bytes = decode_linears(model_shapes, decode_layers, decode_rows, repeats)
            dec_flops = 2 * decode_rows * dec_bytes // 2
    return Roofline(
        core=core,
        cpu_model=cpu_model_name(),
        torch_version=torch.__version__,
        buffer_bytes=nbytes,
        repeats=repeats,
        read_gbs_torch_f32=gbs["torch_f32"],
        read_gbs_torch_bf16=gbs["torch_bf16"],
        read_gbs_numpy_f32=gbs["numpy_f32"],
        read_gbs=gbs[method],
        read_method=method,
        read_gbs_best=nbytes / reads[method].best_s / 1e9,
        read_gbs_wall=nbytes / reads[method].wall_median_s / 1e9,
        copy_gbs=2 * nbytes / cp.median_s / 1e9,
        gemm_shape=gemm_shape,
        gemm_bf16_gflops=flops / g.median_s / 1e9,
        gemm_bf16_gflops_best=flops / g.best_s / 1e9,
        gemm_bf16_gflops_wall=flops / g.wall_median_s / 1e9,
        prefill_shapes=shapes,
        prefill_shapes_gflops=(total_flops / total_s / 1e9) if total_s else None,
        decode_linears_rows=decode_rows if dec else None,
        decode_linears_layers=decode_layers if dec else None,
        decode_linears_s=dec.median_s if dec else None,
        decode_linears_gflops=dec_flops / dec.median_s / 1e9 if dec else None,
        decode_linears_gbs=dec_bytes / dec.median_s / 1e9 if dec else None,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--core", type=int, default=1, help="the core to pin to")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gib", type=float, default=1.0, help="buffer size for the bandwidth runs")
    p.add_argument("--gemm", type=int, nargs=3, default=(2048, 2048, 6144), metavar=("M", "K", "N"))
    p.add_argument("--prefill-tokens", type=int, default=1000, help="T for the qwen3-cpu-bench linear shapes")
    args = p.parse_args()
    # qwen3-cpu-bench: hidden 2048, intermediate 6144, 16 q heads and 2 kv heads of 128.
    shapes = model_prefill_shapes(2048, 6144, 16 * 128, 2 * 128)
    r = measure(args.core, args.repeats, args.gib, tuple(args.gemm), args.prefill_tokens, shapes)
    print(r.to_json())


if __name__ == "__main__":
    main()
