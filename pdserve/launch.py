"""Topologies of pdserve processes on one machine: plan, start, wait until ready, stop.

A `TopologySpec` (frozen) names what runs: `standard` (N standalone instances behind
`pdserve proxy --mode standard`) or `disagg` (X prefill + Y decode instances behind
`pdserve proxy --mode disagg --kv-mode read|write`), optionally with Z `--role both` instances, each
a candidate for either half of every request (`disagg-write:2b`: two of them and no others, the
proxy routing least-loaded). `plan_instances` splits the cores (and GPUs)
between the instances; `launch_topology` starts the proxy and the instances (each in its own
process group, output to `<run_dir>/<name>.log`; instances register with the proxy over ZMQ),
waits until every instance answers /health and the proxy lists them all healthy, and returns a
`RunningTopology`, whose `stop()` ends every child: SIGTERM, then SIGKILL after a grace period.
A SIGKILLed instance's shared-memory KV segment is unlinked by its resource tracker, which is
therefore given a moment to run before the rest of the group is killed.

    with Topology(parse_topology("disagg-write", "dummy:qwen3-tiny")) as topo:
        run_benchmark(BenchConfig(base_url=topo.url, ...))
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import httpx
import psutil

from pdserve.config import DEFAULT_HOST, KVMode, KVTransportName, Role

TopologyKind = Literal["standard", "disagg"]
_ADDR_IN_USE = re.compile(r"address already in use|errno 98", re.IGNORECASE)
_XPYD = re.compile(r"^(?:(\d+)p(\d+)d)?(?:(\d+)b)?$")  # XpYd, Zb or XpYdZb


class TopologyError(RuntimeError):
    """A topology could not start (the message names the failing process and its log)."""


@dataclass(frozen=True)
class TopologySpec:
    """What to run. `cpu_map` (one core tuple per instance) wins over `cpus_per_instance`; with
    neither, the usable cores are divided evenly (at least one each; leftovers stay unpinned)."""

    kind: TopologyKind
    model: str
    instances: int = 1  # standard
    prefill: int = 1  # disagg
    decode: int = 1
    both: int = 0  # disagg: `--role both` instances (either half, per request)
    kv_mode: KVMode = "write"
    kv_transport: KVTransportName = "auto"  # --kv-transport of every prefill and decode instance
    cpus_per_instance: int | None = None
    cpu_map: tuple[tuple[int, ...], ...] | None = None
    gpus: tuple[int, ...] | None = None  # GPU ids split between instances (CUDA_VISIBLE_DEVICES)
    host: str = DEFAULT_HOST
    port: int = 0  # the proxy's HTTP port; 0 picks a free one
    run_dir: str | None = None  # default runs/up-<timestamp>
    engine_args: tuple[str, ...] = ()  # appended to every `pdserve serve` (last flag wins)
    proxy_args: tuple[str, ...] = ()
    proxy_scheme: Literal["http", "https"] = "http"  # https: proxy_args give it --ssl-certfile
    startup_timeout_s: float = 300.0
    stop_grace_s: float = 15.0
    name: str = ""  # label for reports; default `label`

    def __post_init__(self) -> None:
        if self.kind not in ("standard", "disagg"):
            raise ValueError(f"topology must be standard or disagg, got {self.kind!r}")
        if self.instances < 1 or min(self.prefill, self.decode, self.both) < 0:
            raise ValueError("instance counts must be >= 1")
        if self.kind == "disagg" and (self.prefill + self.both < 1 or self.decode + self.both < 1):
            raise ValueError("a disagg topology needs a prefill and a decode instance, or a both instance")
        if self.kv_mode not in ("read", "write"):
            raise ValueError(f"--kv-mode must be read or write, got {self.kv_mode!r}")
        if self.cpus_per_instance is not None and self.cpus_per_instance < 1:
            raise ValueError("--cpus-per-instance must be >= 1")

    @property
    def roles(self) -> tuple[Role, ...]:
        if self.kind == "standard":
            return ("standalone",) * self.instances
        return ("prefill",) * self.prefill + ("decode",) * self.decode + ("both",) * self.both

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "standard":
            return f"standard:{self.instances}"
        pd = f"{self.prefill}p{self.decode}d" if (self.prefill, self.decode) != (0, 0) else ""
        shape = f":{pd}{self.both}b" if self.both else ("" if pd == "1p1d" else f":{pd}")
        return f"disagg-{self.kv_mode}{shape}"


def parse_topology(text: str, model: str, **overrides: object) -> TopologySpec:
    """`standard:N`, `disagg-read`, `disagg-write`, `disagg-write:2p1d`, `disagg-write:2b` (two both
    instances), `disagg-write:1p1d2b` -> a spec (name = text)."""
    head, _, arg = text.strip().partition(":")
    fields: dict[str, object] = {}
    if head == "standard":
        if arg and not arg.isdigit():
            raise ValueError(f"bad topology {text!r}: expected standard:N")
        fields = {"kind": "standard", "instances": int(arg or 1)}
    elif head in ("disagg-read", "disagg-write", "disagg"):
        m = _XPYD.match(arg) if arg else None
        if arg and m is None:
            raise ValueError(f"bad topology {text!r}: expected {head}:XpYd, {head}:Zb or {head}:XpYdZb, "
                             f"e.g. {head}:2p1d or {head}:2b")
        fields = {"kind": "disagg", "kv_mode": head.removeprefix("disagg-") if "-" in head else "write"}
        if m:
            x, y, z = m.groups()
            fields |= {"prefill": int(x or 0), "decode": int(y or 0), "both": int(z or 0)}
    else:
        raise ValueError(f"bad topology {text!r}: expected standard:N, disagg-read or disagg-write[:XpYd]")
    return TopologySpec(model=model, name=text.strip(), **(fields | overrides))  # type: ignore[arg-type]


@dataclass(frozen=True)
class InstancePlan:
    """Where one instance runs."""

    name: str  # e.g. "prefill-0"; also the log file's stem
    role: Role
    cpus: tuple[int, ...]
    gpus: tuple[int, ...] | None = None


def usable_cpus() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def plan_instances(spec: TopologySpec, cpus: Sequence[int] | None = None) -> tuple[InstancePlan, ...]:
    """Split `cpus` (default: this process's affinity) and `spec.gpus` between the instances."""
    avail = tuple(cpus) if cpus is not None else usable_cpus()
    roles = spec.roles
    n = len(roles)
    if spec.cpu_map is not None:
        if len(spec.cpu_map) != n:
            raise ValueError(f"--cpu-map lists {len(spec.cpu_map)} core sets for {n} instances")
        if any(not c for c in spec.cpu_map):
            raise ValueError("--cpu-map: every instance needs at least one core")
        sets = [tuple(c) for c in spec.cpu_map]
    elif spec.cpus_per_instance is not None:
        k = spec.cpus_per_instance
        if n * k > len(avail):
            raise ValueError(f"{n} instances x {k} cores need {n * k} cores; {len(avail)} usable: {avail}")
        sets = [avail[i * k : (i + 1) * k] for i in range(n)]
    else:
        k = len(avail) // n
        sets = [avail[i * k : (i + 1) * k] for i in range(n)] if k else [(avail[i % len(avail)],) for i in range(n)]
    gpu_sets: list[tuple[int, ...] | None] = [None] * n
    if spec.gpus:
        g = len(spec.gpus) // n
        if g == 0:
            raise ValueError(f"{n} instances need at least {n} GPUs; --gpus lists {len(spec.gpus)}")
        gpu_sets = [spec.gpus[i * g : (i + 1) * g] for i in range(n)]
    counters: dict[str, int] = {}
    plans = []
    for role, cs, gs in zip(roles, sets, gpu_sets, strict=True):
        idx = counters[role] = counters.get(role, -1) + 1
        plans.append(InstancePlan(f"{role}-{idx}", role, cs, gs))
    return tuple(plans)


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cpu_text(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def instance_argv(spec: TopologySpec, plan: InstancePlan, port: int, registry: str) -> list[str]:
    """The `pdserve serve` command line of one instance (spec.engine_args last, so they win)."""
    argv = [sys.executable, "-m", "pdserve.cli", "serve", spec.model, "--host", spec.host, "--port", str(port),
            "--role", plan.role, "--proxy-address", registry, "--cpus", _cpu_text(plan.cpus),
            "--threads", str(len(plan.cpus)), "--no-access-log",
            "--drain-timeout", str(max(1.0, spec.stop_grace_s / 3))]
    if plan.role != "standalone":
        argv += ["--kv-mode", spec.kv_mode]
        if spec.kv_transport != "auto":
            argv += ["--kv-transport", spec.kv_transport]
    if plan.gpus is not None:
        argv += ["--device", "cuda"]
    return argv + list(spec.engine_args)


def proxy_argv(spec: TopologySpec, port: int, registry_port: int) -> list[str]:
    argv = [sys.executable, "-m", "pdserve.cli", "proxy", "--host", spec.host, "--port", str(port),
            "--registry-port", str(registry_port), "--mode", spec.kind, "--log-level", "warning"]
    if spec.kind == "disagg":
        argv += ["--kv-mode", spec.kv_mode]
        if spec.both:  # the prefill/decode choice across both instances follows their load
            argv += ["--routing", "least-loaded"]
    return argv + list(spec.proxy_args)


def _die_with_parent() -> None:
    """preexec: SIGTERM this child when the launching thread dies (Linux), so a killed launcher
    leaves no orphans. The child is already in its own session (start_new_session)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    out = []
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
    return out


@dataclass
class ChildProcess:
    """One started process: its own process group (pgid == pid), its output in `log_path`."""

    name: str
    role: Role | Literal["proxy"]
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    host: str
    port: int
    cpus: tuple[int, ...] = ()
    gpus: tuple[int, ...] | None = None
    scheme: Literal["http", "https"] = "http"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal_leader(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.alive():
                self.proc.send_signal(sig)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def start_child(name: str, role: Role | Literal["proxy"], argv: list[str], log_path: Path, host: str, port: int,
                env: dict[str, str] | None = None, **extra: object) -> ChildProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return ChildProcess(name, role, argv, proc, log_path, host, port, **extra)  # type: ignore[arg-type]


def stop_children(children: Sequence[ChildProcess], grace_s: float = 15.0, tracker_s: float = 3.0) -> dict[str, int]:
    """SIGTERM every leader; after `grace_s` SIGKILL the stragglers, give their resource trackers
    `tracker_s` to unlink shared memory, then SIGKILL whatever is left in each group. Returns the
    exit codes (negative: killed by that signal)."""
    for c in children:
        c.signal_leader(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for c in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(max(0.0, deadline - time.monotonic()))
    for c in children:
        if c.alive():
            c.signal_leader(signal.SIGKILL)
            c.proc.wait()
    deadline = time.monotonic() + tracker_s
    while any(group_members(c.pid) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    for c in children:
        c.kill_group()
    return {c.name: c.proc.wait() for c in children}


@dataclass
class RunningTopology:
    """A started topology. `url` is the proxy's; `stop()` is idempotent."""

    spec: TopologySpec
    run_dir: Path
    proxy: ChildProcess
    instances: tuple[ChildProcess, ...]
    exit_codes: dict[str, int] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def children(self) -> tuple[ChildProcess, ...]:
        return (self.proxy, *self.instances)

    def dead(self) -> list[ChildProcess]:
        return [c for c in self.children if not c.alive()]

    def stop(self) -> dict[str, int]:
        if self.exit_codes is None:
            self.exit_codes = stop_children(self.children, self.spec.stop_grace_s)
        return self.exit_codes

    def __enter__(self) -> RunningTopology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_run_dir(prefix: str = "up") -> Path:
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _start(spec: TopologySpec, run_dir: Path, attempt: int) -> RunningTopology:
    plans = plan_instances(spec)
    port = spec.port or free_port(spec.host)
    registry_port = free_port(spec.host)
    suffix = f".retry{attempt}" if attempt else ""
    proxy = start_child("proxy", "proxy", proxy_argv(spec, port, registry_port), run_dir / f"proxy{suffix}.log",
                        spec.host, port, scheme=spec.proxy_scheme)
    running = RunningTopology(spec, run_dir, proxy, ())
    try:
        for plan in plans:
            p = free_port(spec.host)
            env = {"CUDA_VISIBLE_DEVICES": _cpu_text(plan.gpus)} if plan.gpus is not None else None
            child = start_child(plan.name, plan.role, instance_argv(spec, plan, p, f"{spec.host}:{registry_port}"),
                                run_dir / f"{plan.name}{suffix}.log", spec.host, p, env, cpus=plan.cpus, gpus=plan.gpus)
            running.instances = (*running.instances, child)
        wait_ready(running, spec.startup_timeout_s)
    except BaseException:
        running.stop()
        raise
    return running


def launch_topology(spec: TopologySpec, retries: int = 2) -> RunningTopology:
    """Start `spec` and wait until it serves; TopologyError (naming the failing process and its
    log) when it does not within `spec.startup_timeout_s`. A port taken between picking it and
    binding it (another program on the machine) is retried with fresh ports."""
    run_dir = Path(spec.run_dir) if spec.run_dir else default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            return _start(spec, run_dir, attempt)
        except TopologyError as e:
            if attempt == retries or not _ADDR_IN_USE.search(str(e)):
                raise
    raise AssertionError("unreachable")


def _instances_seen(client: httpx.Client, url: str) -> dict[str, bool]:
    """`host:port` -> healthy, from the proxy's GET /instances."""
    rows = client.get(f"{url}/instances", timeout=2).json()
    return {r["address"]: bool(r["healthy"]) for r in rows}


def wait_ready(topo: RunningTopology, timeout_s: float) -> None:
    """Until every instance answers /health, the proxy lists each one healthy and its /health is 200."""
    deadline = time.monotonic() + timeout_s
    pending = {c.name for c in topo.instances}
    # An HTTPS proxy's certificate is not checked here: the client only asks this machine's own child
    # for its health (no credentials sent), and the certificate may name the public host, not spec.host.
    with httpx.Client(trust_env=False, verify=topo.proxy.scheme == "http") as client:
        while True:
            for c in topo.children:
                if not c.alive():
                    raise TopologyError(f"{c.name} (pid {c.pid}) exited with code {c.proc.returncode} during startup;"
                                        f" log {c.log_path}:\n{c.log_tail()}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                for c in topo.instances:
                    if c.name in pending and client.get(f"{c.url}/health", timeout=2).status_code == 200:
                        pending.discard(c.name)
                if not pending:
                    seen = _instances_seen(client, topo.url)
                    unseen = [c for c in topo.instances if not seen.get(f"{c.host}:{c.port}")]
                    if not unseen and client.get(f"{topo.url}/health", timeout=2).status_code == 200:
                        return
            if time.monotonic() > deadline:
                raise TopologyError(_not_ready_message(topo, pending, timeout_s))
            time.sleep(0.2)


def _not_ready_message(topo: RunningTopology, pending: set[str], timeout_s: float) -> str:
    if pending:
        c = next(c for c in topo.instances if c.name in pending)
        what = f"{c.name} ({c.url}) did not answer GET /health 200"
    else:
        c = topo.proxy
        what = f"the proxy ({c.url}) did not list every instance healthy or /health was not 200"
    return f"topology {topo.spec.label} not ready after {timeout_s:g} s: {what}; log {c.log_path}:\n{c.log_tail()}"


class Topology:
    """Context manager: `with Topology(spec) as running: ...` starts `spec` and always stops it."""

    def __init__(self, spec: TopologySpec) -> None:
        self.spec = spec
        self.running: RunningTopology | None = None

    def __enter__(self) -> RunningTopology:
        self.running = launch_topology(self.spec)
        return self.running

    def __exit__(self, *exc: object) -> None:
        if self.running is not None:
            self.running.stop()
