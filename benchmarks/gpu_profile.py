"""Where a decode step's and a prefill's device time goes: kernels by name, count and time.

    python3 benchmarks/gpu_profile.py [--model dummy:qwen3-8b] [--ctx 2000] [--out FILE]
    .venv/bin/python benchmarks/gpu_profile.py --device cpu --model dummy:qwen3-tiny --ctx 64   # smoke

Builds the engine as benchmarks/gpu_model.py does, prefills one `--ctx`-token request, then runs
under torch.profiler: one eager decode step at batch 1 (CUDA graphs off, so every kernel is seen;
its kernels' summed device time is what a graph replay pays, without the launch gaps) and one
`--ctx`-token prefill. Kernels are grouped as GEMM (cuBLAS / CUTLASS names), attention (the
Triton decode kernel, SDPA / flash) and the rest (elementwise, norms, rope, copies). Prints the
groups and the top kernels; writes one JSON (also to $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import ensure_deps  # noqa: E402

ensure_deps()  # the carried wheels (runs/gpu_wheels) when the image lacks pdserve's imports

from gpu_model import make_engine, prompt, sync  # noqa: E402

from pdserve.engine.sampling_params import SamplingParams  # noqa: E402

GEMM = ("gemm", "gemv", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "nvjet", "matmul", "addmm", "mm")
ATTENTION = ("_partial", "_combine", "flash", "fmha", "attention", "sdpa", "efficient")


def group(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ATTENTION):
        return "attention"
    if any(k in low for k in GEMM):
        return "gemm"
    return "other"


def kernels(prof: profile, device: str) -> dict:
    """Device time by kernel name (CUDA kernels; on CPU the aten ops' self time)."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        us = e.self_device_time_total if device != "cpu" else e.self_cpu_time_total
        if us <= 0 or (device == "cpu" and not e.key.startswith("aten::")):
            continue
        if device != "cpu" and not str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue  # a CPU op (its kernels are counted as themselves)
        by_name[e.key][0] += e.count
        by_name[e.key][1] += us
    groups: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "us": 0.0})
    for name, (n, us) in by_name.items():
        g = groups[group(name)]
        g["count"] += n
        g["us"] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    return {"total_us": sum(v[1] for v in by_name.values()), "launches": sum(v[0] for v in by_name.values()),
            "groups": dict(groups), "top": [{"name": k[:140], "count": n, "us": us} for k, (n, us) in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:qwen3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ctx", type=int, default=2000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    s = {"ctx": a.ctx, "batches": [1]}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device != "cpu" else [])
    rec: dict = {"model": a.model, "device": torch.cuda.get_device_name() if a.device != "cpu" else "cpu",
                 "torch": torch.__version__, "ctx": a.ctx}
    with torch.inference_mode():
        eng = make_engine(a, s)
        sp = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0)
        eng.add_request("d", prompt(a.ctx, 0), sp)
        req = eng.scheduler.requests["d"]
        while req.num_computed_tokens < req.num_prompt_tokens:
            eng.step()
        static, eng.runner.static = eng.runner.static, None  # eager: every kernel launched on its own
        for _ in range(3):
            eng.step()
        sync(eng.device)
        with profile(activities=activities) as prof:
            eng.step()
            sync(eng.device)
        rec["decode_b1_eager"] = kernels(prof, a.device)
        eng.runner.static = static
        eng.abort_request("d")
        eng.step()
        eng.add_request("p", prompt(a.ctx, 1), SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0))
        sync(eng.device)
        with profile(activities=activities) as prof:
            eng.step()
            sync(eng.device)
        rec["prefill"] = kernels(prof, a.device)
    for key in ("decode_b1_eager", "prefill"):
        r = rec[key]
        parts = ", ".join(f"{g} {v['us'] / 1e3:.2f} ms / {v['count']}" for g, v in sorted(r["groups"].items()))
        print(f"{key}: {r['total_us'] / 1e3:.2f} ms device time in {r['launches']} launches ({parts})")
        for k in r["top"][:15]:
            print(f"   {k['us'] / 1e3:8.3f} ms {k['count']:5d}x  {k['name'][:110]}")
    text = json.dumps(rec, indent=1)
    for path in filter(None, (a.out, os.environ.get("OUT") and os.path.join(os.environ["OUT"], "gpu_profile.json"))):
        Path(path).write_text(text)


if __name__ == "__main__":
    main()
