"""One GPU session's checks in under 8 minutes, written to one JSON of figures.

On the GPU machine, from the repo root, with the image's `python3` (it has torch with CUDA and
Triton; pdserve is NOT installed: this script puts the repo root on sys.path and on PYTHONPATH
for every process it starts):

    python3 benchmarks/gpu_check.py                  # every stage, H100/H200 sizes
    python3 benchmarks/gpu_check.py --stages model   # some stages only

Packages the image lacks (pyzmq, msgspec, fastapi, uvicorn, pydantic, ...) travel as wheels:
run `bash benchmarks/gpu_wheels.sh` here once (it fills runs/gpu_wheels, git-ignored) and name
`runs/gpu_wheels` in the device run's `carry`; when an import is missing, the script picks the
wheels that fit its Python (one per project) and pip-installs them (--no-index) into a temporary
folder (the JSON's `deps` says what was missing and installed).

Stages, each in its own process with its own time box, which also gets whatever earlier stages
left unused (a stage that fails or runs out of time is recorded with what it measured so far, and
the next stage runs; the JSON is rewritten after every stage):

1. tests: pytest -m gpu tests/gpu (CUDA graphs vs eager, Triton kernel and SDPA vs torch, engine
   on CUDA vs CPU, cuda_ipc between engines and between two `pdserve serve` processes), plus
   tests/unit/test_static_decode.py and test_triton_fused.py at the same time (the Triton kernels under
   their CPU interpreter too); both logs are copied to $OUT.
2. cuda_vs_cpu: dummy:qwen3-tiny greedy tokens on CUDA (graphs, and eager) against CPU, fp32;
   bf16 agreement for information.
3. model (benchmarks/gpu_model.py): HBM copy bandwidth and bf16 GEMM rate, then dummy:qwen3-8b
   in bf16: decode step at batch 1 and 32 with 2000-token contexts (graphs, and eager beside
   them), a 2000-token prefill, and the decode attention kernels alone; each figure next to its
   limit from the same run.
4. disagg (benchmarks/gpu_disagg.py): prefill and decode as two `pdserve serve` processes on the
   one GPU over cuda_ipc, read and write modes, float32 (--disagg-dtype): outputs against a
   standalone instance, and TTFT/ITL of a short bench; then two `--role both` instances, each the
   prefill half of some requests and the decode half of others.

Output: benchmarks/results/gpu_check_<device>_<date>.json (also copied to $OUT when set) and a
summary on stdout. `--device cpu --quick` runs every stage at toy sizes on a CPU (smoke test of
this script; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
WHEELS = REPO / "runs" / "gpu_wheels"
# Worst-case seconds per stage (H100); the whole run is also capped by --budget.
STAGES = {"tests": 150, "cuda_vs_cpu": 50, "model": 140, "disagg": 110}
NEEDED = ("zmq", "msgspec", "fastapi", "uvicorn", "pydantic", "llguidance", "tqdm", "prometheus_client", "psutil")
MARK = "PDSERVE_GPU_CHECK_STAGE"  # in the environment of every process a stage starts


class Record(dict):
    """A stage's figures; every assignment rewrites the JSON file, so a killed stage keeps them."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=2, default=str))
        tmp.replace(self.path)


def pick_wheels(wheels: list[Path], supported: list | None = None) -> list[Path]:
    """Of each project's wheels (runs/gpu_wheels holds them for several Python versions), the one
    this interpreter ranks first: the earliest of `supported` (its tags in priority order; default
    packaging's sys_tags()) that one of the wheel's tags matches. Projects with none are left out."""
    try:
        from packaging import tags, utils
    except ImportError:  # pip vendors it
        from pip._vendor.packaging import tags, utils  # type: ignore[no-redef]
    rank = {t: i for i, t in enumerate(tags.sys_tags() if supported is None else supported)}
    best: dict[str, tuple[int, Path]] = {}
    for w in wheels:
        try:
            name, _, _, wheel_tags = utils.parse_wheel_filename(w.name)
        except Exception:  # not a wheel's name
            continue
        r = min((rank[t] for t in wheel_tags if t in rank), default=None)
        if r is not None and (name not in best or r < best[name][0]):
            best[name] = (r, w)
    return sorted((w for _, w in best.values()), key=lambda p: p.name)


def install_wheels(wheels: list[Path], site: Path) -> None:
    """Into `site`: with pip (--no-index), or where pip is missing or fails, by unpacking each wheel
    (all these are plain ones). A marker file says the folder is complete."""
    shutil.rmtree(site, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), *map(str, wheels)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print(f"WARNING: pip install of the carried wheels failed ({r.returncode}), unpacking them instead:\n"
              f"{r.stdout[-2000:]}", flush=True)
        shutil.rmtree(site, ignore_errors=True)
        import zipfile

        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
    (site / ".complete").write_text("\n".join(w.name for w in wheels))


def ensure_deps() -> dict:
    """Put the repo root (and, if imports are missing, the carried wheels that fit this Python) on
    the import path of this process and of every process it starts. Never raises: what is still
    missing is reported (and fails the stages that need it)."""
    paths = [str(REPO)]
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    info: dict = {"python": sys.version.split()[0], "missing": missing}
    if missing:
        try:
            wheels = pick_wheels(sorted(WHEELS.glob("*.whl")))
            info["wheels"] = [w.name for w in wheels]
            if not wheels:
                print(f"WARNING: {', '.join(missing)} missing and no wheels for this Python in {WHEELS}: "
                      "run benchmarks/gpu_wheels.sh", flush=True)
            else:
                site = Path(tempfile.gettempdir()) / f"pdserve-gpu-site-{sys.version_info[0]}{sys.version_info[1]}"
                if not (site / ".complete").exists():
                    install_wheels(wheels, site)
                paths.append(str(site))
        except Exception as e:
            print(f"WARNING: could not install the carried wheels: {e!r}", flush=True)
            info["error"] = repr(e)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    sys.path[:0] = paths
    importlib.invalidate_caches()
    if missing:
        info["still_missing"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
        if info["still_missing"]:
            print(f"WARNING: still missing: {', '.join(info['still_missing'])}", flush=True)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (smoke test of this script)")
    p.add_argument("--quick", action="store_true", help="toy sizes (with --device cpu)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all stages together")
    p.add_argument("--model", default=None, help="model stage's model (default dummy:qwen3-8b; quick: tiny)")
    p.add_argument("--disagg-model", default=None, help="disagg stage's model (default dummy:qwen3-0.6b)")
    # float32: the decode instance recomputes the last prompt token (a 1-row step where standalone had
    # the whole chunk), and in bf16 those rows round differently, so greedy texts can drift apart.
    p.add_argument("--disagg-dtype", default="float32", help="disagg stage's --dtype (default float32)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child mode: run this one stage
    p.add_argument("--stage-out", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.model = a.model or ("dummy:qwen3-tiny" if a.quick else "dummy:qwen3-8b")
    a.disagg_model = a.disagg_model or ("dummy:qwen3-tiny" if a.quick else "dummy:qwen3-0.6b")
    return a


# ---- stages 1 and 2 (the others live in gpu_model.py and gpu_disagg.py) -----------------------


def pytest_counts(text: str) -> dict[str, int]:
    """Outcome counts of a `pytest -v` log: from its final summary line, or (a run cut short, which
    has none) from the per-test result lines so far."""
    kinds = ("passed", "failed", "skipped", "error")
    final = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s.*?) ?=*$", text, re.M)
    if final:
        return {k: sum(int(n) for n in re.findall(rf"(\d+) {k}", final[-1])) for k in kinds}
    seen = re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR)\b", text)
    return {k: sum(o.lower() == k for o in seen) for k in kinds}


def stage_tests(a: argparse.Namespace, rec: Record) -> None:
    """Each pytest run logs to a file; what it logged is recorded even if the stage's time box ends
    it (the driver's SIGTERM unwinds through the finally)."""
    base = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--durations=8"]
    # test_static_decode.py's tests are not gpu-marked (they run on CPU, the Triton one where
    # Triton is installed): a second call without the marker filter.
    runs = {"gpu": [*base, "-m", "gpu", "tests/gpu"], "static_decode": [*base, "tests/unit/test_static_decode.py",
                                                                  "tests/unit/test_triton_fused.py"]}
    logs: dict[str, Path] = {}
    codes: dict[str, int] = {}
    procs: dict[str, subprocess.Popen] = {}
    # Both at once: static_decode runs on the CPU (its Triton test in the interpreter), the other on
    # the GPU, so neither waits for the other; static_decode gets few threads to leave cores free.
    envs = {"gpu": os.environ, "static_decode": {**os.environ, "OMP_NUM_THREADS": "4"}}
    rec["command"] = " & ".join(" ".join(c[2:]) for c in runs.values())
    try:
        for name, c in runs.items():
            logs[name] = a.stage_out.with_name(f"pytest_{name}.log")
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen(c, cwd=REPO, env=envs[name], stdout=log, stderr=subprocess.STDOUT)
        for name, p in procs.items():
            codes[name] = p.wait()
            rec["exit_codes"] = codes
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        if os.environ.get("OUT"):  # the whole logs come back with the JSON
            for path in logs.values():
                with contextlib.suppress(OSError):
                    shutil.copy(path, Path(os.environ["OUT"]) / path.name)
        texts = {name: path.read_text(errors="replace") if path.exists() else "" for name, path in logs.items()}
        text = "\n".join(texts.values())
        per_run = {name: pytest_counts(t) for name, t in texts.items()}
        rec["runs"] = per_run
        counts = {k: sum(c[k] for c in per_run.values()) for k in ("passed", "failed", "skipped", "error")}
        rec["counts"] = counts
        rec["failures"] = re.findall(r"^(?:FAILED|ERROR) .*$", text, re.M)[:30]
        rec["slowest"] = re.findall(r"^\d+\.\d+s (?:call|setup|teardown) .*$", text, re.M)[:16]
        finished = all(re.search(r" in [\d.]+s", t) for t in texts.values()) and len(texts) == len(runs)
        if counts["failed"] or counts["error"] or not finished:
            rec["output_tail"] = text[-6000:]
    if counts["failed"] or counts["error"]:
        raise AssertionError(f"{counts['failed']} failed, {counts['error']} errors")
    crashed = {name: rc for name, rc in codes.items() if rc not in (0, 5)}  # 5: nothing collected
    if crashed:  # a crash (a signal, an internal error) leaves no failure line to count
        raise AssertionError(f"pytest exit codes {crashed}")


def stage_cuda_vs_cpu(a: argparse.Namespace, rec: Record) -> None:
    import torch

    from pdserve import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 40, 100, 300, 1000, 17)]
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)

    def run(**kw) -> list[list[int]]:
        llm = LLM("dummy:qwen3-tiny", num_kv_blocks=1024, max_model_len=2048, max_num_seqs=8, **kw)
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        finally:
            llm.close()

    ref = run(device="cpu", dtype="float32")
    graphs = run(device=a.device, dtype="float32")
    rec["fp32_graphs_equal_cpu"] = graphs == ref
    eager = run(device=a.device, dtype="float32", enforce_eager=True)
    rec["fp32_eager_equal_cpu"] = eager == ref
    bf16 = run(device=a.device, dtype="bfloat16")
    rec["bf16_sequences_equal_cpu_fp32"] = f"{sum(x == y for x, y in zip(bf16, ref, strict=True))}/{len(ref)}"
    rec["bf16_first_tokens_equal"] = sum(x[0] == y[0] for x, y in zip(bf16, ref, strict=True)) == len(ref)
    if not (rec["fp32_graphs_equal_cpu"] and rec["fp32_eager_equal_cpu"]):
        raise AssertionError("fp32 tokens on the device differ from CPU")


def run_stage(a: argparse.Namespace) -> None:
    """Child mode: run one stage, its figures into --stage-out."""
    rec = Record(a.stage_out)
    if a.stage == "tests":
        stage_tests(a, rec)
    elif a.stage == "cuda_vs_cpu":
        stage_cuda_vs_cpu(a, rec)
    elif a.stage == "model":
        importlib.import_module("gpu_model").run(a, rec)
    elif a.stage == "disagg":
        importlib.import_module("gpu_disagg").run(a, rec)
    else:
        raise SystemExit(f"unknown stage {a.stage!r}")


# ---- the driver ----------------------------------------------------------------------------------


def device_name(device: str) -> str:
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # only a label
        pass
    import platform

    return platform.processor() or "cpu"


def run_child(cmd: list[str], limit: float) -> tuple[bool, str | None, str]:
    """Run one stage's process; past `limit` SIGTERM it (its servers stop in its finally blocks),
    then SIGKILL its group. Whatever it or its children left running is killed after."""
    mark = f"{MARK}={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, MARK: mark.split("=", 1)[1]}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        try:
            _, tail = proc.communicate(timeout=limit)
            return proc.returncode == 0, None if proc.returncode == 0 else f"exit {proc.returncode}", tail
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                _, tail = proc.communicate(timeout=25)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                kill_marked(mark)  # first: a leftover holding the stderr pipe would keep it open
                try:
                    _, tail = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    tail = ""
            return False, f"timed out after {limit:.0f} s", tail or ""
    finally:
        kill_marked(mark)


def kill_marked(mark: str) -> None:
    """SIGKILL every process whose environment holds `mark` (a stage's leftovers: servers, pytest)."""
    needle = mark.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def drive(a: argparse.Namespace, argv: list[str], deps: dict | None = None) -> int:
    names = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = set(names) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages: {', '.join(sorted(unknown))}")
    import torch

    dev_name = device_name(a.device)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev_name).strip("-").lower() or "device"
    out = a.out or RESULTS_DIR / f"gpu_check_{slug}_{stamp}{'_quick' if a.quick else ''}.json"
    report: dict = {
        "device": dev_name, "torch": torch.__version__, "cuda": torch.version.cuda, "started": stamp,
        "args": vars(a) | {"out": str(out), "stage_out": None}, "deps": deps, "stages": {},
    }
    deadline = time.monotonic() + a.budget
    tmpdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def write() -> None:
        """The report so far, to `out` (and $OUT): rewritten after every stage, so a run cut off
        (the device call's own time limit) still leaves the stages it finished."""
        report["total_seconds"] = round(a.budget - (deadline - time.monotonic()), 1)
        report["targets"] = targets(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(out)
        if os.environ.get("OUT"):
            shutil.copy(out, Path(os.environ["OUT"]) / out.name)

    write()
    for i, name in enumerate(names):
        left = deadline - time.monotonic()
        if left < 10:
            report["stages"][name] = {"ok": False, "error": "no time left in the budget"}
            write()
            continue
        # A stage may use what earlier stages left unused: all that is left but the later stages' boxes.
        limit = max(min(STAGES[name], left), left - sum(STAGES[n] for n in names[i + 1 :]))
        stage_out = tmpdir / f"{name}.json"
        print(f"== {name} (at most {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--stage", name, "--stage-out", str(stage_out)]
        ok, err, tail = run_child(cmd, limit)
        try:
            figures = json.loads(stage_out.read_text()) if stage_out.exists() else {}
        except ValueError as e:
            figures = {"figures_unreadable": str(e)}
        entry = {"ok": ok, "seconds": round(time.monotonic() - t0, 1), "limit_s": round(limit), "error": err,
                 **figures}
        if not ok:
            entry["stderr_tail"] = tail[-4000:]
        report["stages"][name] = entry
        write()
        print(f"   {'ok' if ok else 'FAILED: ' + str(err)} in {entry['seconds']} s", flush=True)
        if not ok:
            print(tail[-2000:], flush=True)
    write()
    shutil.rmtree(tmpdir, ignore_errors=True)
    print_summary(report, out)
    return 0 if all(s.get("ok") for s in report["stages"].values()) else 1


def targets(report: dict) -> dict:
    """The issue's targets, judged on this run's figures (None: not measured)."""
    model = report["stages"].get("model", {})
    disagg = report["stages"].get("disagg", {})
    b1 = (model.get("decode") or {}).get("1", {})
    pre = model.get("prefill") or {}
    ratio = b1.get("step_vs_roofline")
    return {
        "decode_b1_step_le_1.5x_roofline": None if ratio is None else ratio <= 1.5,
        "prefill_2000_le_60ms": None if pre.get("tokens") != 2000 else pre["median_ms"] <= 60.0,
        "disagg_outputs_equal_standalone": disagg.get("all_equal"),
    }


def print_summary(report: dict, out: Path) -> None:
    print(f"\n== gpu_check on {report['device']} (torch {report['torch']}, CUDA {report['cuda']}), "
          f"{report['total_seconds']} s")
    for name, s in report["stages"].items():
        print(f"-- {name}: {'ok' if s.get('ok') else 'FAILED (' + str(s.get('error')) + ')'}"
              f" [{s.get('seconds', '-')} s]")
        for line in s.get("summary", []):
            print(f"   {line}")
        if name == "tests" and "counts" in s:
            print(f"   {s['counts']}" + "".join(f"\n   {f}" for f in s.get("failures", [])))
        if name == "cuda_vs_cpu":
            print("   " + ", ".join(f"{k}={s[k]}" for k in s if k.startswith(("fp32", "bf16"))))
    print(f"-- targets: {report['targets']}")
    print(f"-- written: {out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    deps = ensure_deps()
    if a.stage:
        # SIGTERM (the driver's time box) unwinds: finally blocks stop the servers a stage started.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            run_stage(a)
        except Exception:
            traceback.print_exc()
            return 1
        return 0
    return drive(a, argv, deps)


if __name__ == "__main__":
    sys.exit(main())
