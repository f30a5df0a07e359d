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
prefill shapes (x [T, in] by weight [out, in], as nn.Linear does).

The machine is shared: each figure is the median of `repeats` timed runs after one warm-up (the
best run is reported beside it).
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
    median_s: float
    best_s: float
    runs_s: list[float]


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
    copy_gbs: float  # (read + write bytes) / s, median
    gemm_shape: tuple[int, int, int]  # M, K, N
    gemm_bf16_gflops: float  # median
    gemm_bf16_gflops_best: float
    # name -> {"shape": [M, K, N], "gflops": median} for a model's prefill linears (if asked).
    prefill_shapes: dict[str, dict] = field(default_factory=dict)
    prefill_shapes_gflops: float | None = None  # FLOP-weighted rate over those shapes (one layer)

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
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Timing(statistics.median(runs), min(runs), runs)


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
        total_flops = total_s = 0.0
        if model_shapes and prefill_tokens:
            for name, (fin, fout) in model_shapes.items():
                t = linear_rate(prefill_tokens, fin, fout, max(3, repeats // 2))
                f = 2 * prefill_tokens * fin * fout
                shapes[name] = {"shape": [prefill_tokens, fin, fout], "gflops": f / t.median_s / 1e9}
                total_flops += f
                total_s += t.median_s
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
        copy_gbs=2 * nbytes / cp.median_s / 1e9,
        gemm_shape=gemm_shape,
        gemm_bf16_gflops=flops / g.median_s / 1e9,
        gemm_bf16_gflops_best=flops / g.best_s / 1e9,
        prefill_shapes=shapes,
        prefill_shapes_gflops=(total_flops / total_s / 1e9) if total_s else None,
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
