"""The article's experiment on one GPU: `pdserve sweep` of collocated against disaggregated serving.

On the GPU machine, from the repo root, with the image's `python3` (carry `runs/gpu_wheels`, as for
gpu_check.py; this script installs what the image lacks the same way):

    python3 benchmarks/gpu_sweep.py                 # dummy:qwen3-8b, bf16, ~4 minutes on an H200
    .venv/bin/python benchmarks/gpu_sweep.py --device cpu --quick   # smoke test here

Every instance shares the one GPU: `standard:2` is two collocated instances, `disagg-write` and
`disagg-read` a prefill and a decode instance (cuda_ipc between them). So this is not the article's
8-GPU split; it measures what disaggregation does on the hardware one has, where the prefill's
kernels still share the GPU with the decode's (time-sliced between the processes), but no longer
sit in the decode's steps. The workload follows the article's (Table 3): 2000-token prompts, TTFT
≤ 1 s and ITL ≤ 50 ms, Poisson arrivals; shorter outputs (500) and fewer prompts per rate (40) to
fit a device call.

Writes the sweep's outputs (results.json, summary.md, figures) to runs/gpu_sweep and $OUT/gpu_sweep,
and prints the summary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import ensure_deps  # noqa: E402


def sweep_argv(a: argparse.Namespace, out: Path) -> list[str]:
    """The `pdserve sweep` command line for these flags."""
    if a.quick:
        model, lens, prompts, rates, engine = "dummy:qwen3-tiny", ("100", "16"), "6", "2,4", "--dtype float32"
    else:
        model, lens, prompts, rates = a.model, ("2000", "500"), "40", a.rates
        engine = f"--dtype bfloat16 --kv-cache-gib {a.kv_cache_gib} --max-model-len 4096"
    transport = "cuda_ipc" if a.device.startswith("cuda") else "shm"
    return [
        sys.executable, "-m", "pdserve.cli", "sweep", model, "--topologies", a.topologies, "--rates", rates,
        "--input-len", lens[0], "--output-len", lens[1], "--num-prompts", prompts, "--ignore-eos",
        "--ttft-slo", "1000", "--itl-slo", "50", "--no-progress", "--out", str(out),
        "--engine-args", f"--device {a.device} {engine} --kv-transport {transport}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:qwen3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--topologies", default="standard:2,disagg-write,disagg-read")
    ap.add_argument("--rates", default="2,4,8")
    ap.add_argument("--kv-cache-gib", type=float, default=10.0, help="per instance (two share the GPU)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (a smoke test of this script)")
    a = ap.parse_args()
    deps = ensure_deps()
    out = REPO / "runs" / "gpu_sweep"
    shutil.rmtree(out, ignore_errors=True)
    argv = sweep_argv(a, out)
    print("deps:", deps, "\n$", " ".join(argv[1:]), flush=True)
    code = subprocess.call(argv, cwd=REPO)
    if os.environ.get("OUT") and out.exists():
        shutil.copytree(out, Path(os.environ["OUT"]) / "gpu_sweep", dirs_exist_ok=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
