"""`pdserve sweep`: every topology (and any external endpoint) over a range of request rates.

Each topology is started once (`pdserve.launch`), warmed up, driven at every rate in turn with the
same workload, and stopped; an external endpoint (`--base-url NAME=URL`, e.g. vLLM) is driven the
same way without being started. Around each rate's timed requests every process's /metrics is
scraped (phases.py: where the time went, per role). The analysis (attainment curves, DistServe
goodput, the headline table) is in sweep_report.py, the figures in sweep_plots.py.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from pdserve.bench.client import RequestRecord
from pdserve.bench.metrics import SLO, parse_slo, parse_slos, summarize
from pdserve.bench.phases import Breakdown, PhaseProbe, Target
from pdserve.bench.runner import BenchConfig, BenchResult, run_benchmark

if TYPE_CHECKING:  # launch.py is imported where a topology starts (it pulls in the servers' stack)
    from pdserve.launch import Topology

DEFAULT_TOPOLOGIES = ("standard:1", "standard:2", "disagg-read", "disagg-write")
BASELINE = "standard:2"
HEADLINE_SET = "both"


def parse_rates(text: str) -> tuple[float, ...]:
    """`START:STOP:STEP` (STOP included when on the grid) or a comma list -> sorted distinct rates > 0."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = math.floor((stop - start) / step + 1e-9)
            rates = [round(start + i * step, 9) for i in range(n + 1)]
        else:
            rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad rates {text!r}: expected START:STOP:STEP (e.g. 0.5:10:0.5) or a list (1,2,4)") from None
    if not rates or any(not (math.isfinite(r) and r > 0) for r in rates):
        raise ValueError(f"bad rates {text!r}: every rate must be a finite number > 0")
    return tuple(sorted(set(rates)))


@dataclass(frozen=True)
class SLOSet:
    """A named set of criteria a request must all meet, e.g. both = ttft:1000 + itl_p99:50."""

    name: str
    slos: tuple[SLO, ...]

    def spec(self) -> str:
        return ",".join(s.spec() for s in self.slos)

    def describe(self) -> str:
        return " and ".join(f"{s.label} <= {s.threshold_ms:g} ms" for s in self.slos)


def default_slo_sets(ttft_ms: float = 1000.0, itl_ms: float = 50.0) -> tuple[SLOSet, ...]:
    """Both SLOs (ITL as the request's p99 gap; the headline), both with ITL as TPOT, and each alone."""
    ttft, p99, tpot = (parse_slo(f"{n}:{v:g}") for n, v in (("ttft", ttft_ms), ("itl_p99", itl_ms), ("tpot", itl_ms)))
    return (
        SLOSet(HEADLINE_SET, (ttft, p99)),
        SLOSet("both-tpot", (ttft, tpot)),
        SLOSet("ttft", (ttft,)),
        SLOSet("itl_p99", (p99,)),
        SLOSet("tpot", (tpot,)),
    )


def parse_slo_set(text: str) -> SLOSet:
    """`NAME=CRIT,CRIT`, e.g. `strict=ttft:500,itl_p99:30`."""
    name, sep, crits = text.partition("=")
    if not sep or not name.strip() or not crits.strip():
        raise ValueError(f"bad SLO set {text!r}: expected NAME=ttft:1000,itl_p99:50")
    return SLOSet(name.strip(), parse_slos([c for c in crits.split(",") if c.strip()]))


def parse_named_url(text: str) -> tuple[str, str]:
    """`NAME=URL` (an external endpoint swept as series NAME)."""
    name, sep, url = text.partition("=")
    if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
        raise ValueError(f"bad --base-url {text!r}: expected NAME=http://HOST:PORT")
    return name.strip(), url.strip()


@dataclass(frozen=True)
class RatePoint:
    """One rate of one series: the records (in request order) and the run's duration."""

    rate: float
    records: tuple[RequestRecord, ...]
    duration_s: float
    result: BenchResult | None = None  # the full result, for the JSON (None in synthetic tests)
    load_avg_1m: float | None = None  # the machine's 1-minute load average after the run (noise check)
    busy_before: float | None = None  # fraction of all CPU time busy just before the run (others' work)
    phases: Breakdown | None = None  # server-side phase means per role (None: not a pdserve topology, older file)

    @classmethod
    def of(cls, result: BenchResult, busy_before: float | None = None) -> RatePoint:
        return cls(result.config.request_rate, result.records, result.duration_s, result, os.getloadavg()[0],
                   busy_before, result.phases)


@dataclass(frozen=True)
class Series:
    """Everything measured on one topology or external endpoint."""

    name: str
    kind: str  # "topology" or "external"
    base_url: str
    points: tuple[RatePoint, ...] = ()
    error: str | None = None  # why it stopped early (did not start, died mid-sweep)

    def at(self, rate: float) -> RatePoint | None:
        return next((p for p in self.points if math.isclose(p.rate, rate)), None)


@dataclass(frozen=True)
class SweepConfig:
    """A whole sweep. `bench` is the template of every run (workload, endpoint, SLOs of its JSON);
    its base_url and request_rate are replaced per series and rate."""

    model: str
    bench: BenchConfig
    rates: tuple[float, ...]
    topologies: tuple[str, ...] = DEFAULT_TOPOLOGIES
    external: tuple[tuple[str, str], ...] = ()  # (name, url)
    slo_sets: tuple[SLOSet, ...] = default_slo_sets()
    headline_rate: float | None = None  # None: the swept rate nearest 0.8 x the highest
    headline_set: str = HEADLINE_SET
    baseline: str = BASELINE
    warmup: int = 4  # requests sent before the first rate of each series
    engine_args: tuple[str, ...] = ()
    proxy_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    out_dir: str = "runs/sweep"
    quiet_busy: float | None = None  # before each rate, wait until the machine is at most this busy
    quiet_timeout_s: float = 120.0  # ... but no longer than this

    def __post_init__(self) -> None:
        names = [s.name for s in self.slo_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"SLO set names must be distinct: {names}")
        if self.headline_set not in names:
            raise ValueError(f"headline SLO set {self.headline_set!r} is not among {names}")
        series = list(self.topologies) + [n for n, _ in self.external]
        if len(set(series)) != len(series) or not series:
            raise ValueError(f"need at least one series, all names distinct: {series}")

    @property
    def headline(self) -> SLOSet:
        return next(s for s in self.slo_sets if s.name == self.headline_set)

    @property
    def chosen_headline_rate(self) -> float:
        return pick_headline_rate(self.rates, self.headline_rate)


def pick_headline_rate(rates: Sequence[float], wanted: float | None) -> float:
    """`wanted` if swept, else the swept rate nearest to it (default: nearest 0.8 x the highest)."""
    target = wanted if wanted is not None else 0.8 * max(rates)
    return min(rates, key=lambda r: (abs(r - target), -r))


Log = Callable[[str], None]


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(v), v[3] + v[4]


def cpu_busy(interval_s: float = 2.0) -> float | None:
    """Fraction of all CPU time (every core) spent busy over the next `interval_s`; None off Linux.
    Measured while the topology idles, it is the load other programs put on the machine."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(interval_s)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_quiet(max_busy: float, timeout_s: float, log: Log) -> float | None:
    """Block until the machine is at most `max_busy` busy (or `timeout_s` passed); the last reading."""
    deadline = time.monotonic() + timeout_s
    busy = cpu_busy()
    while busy is not None and busy > max_busy and time.monotonic() < deadline:
        log(f"  machine {busy:.0%} busy (other programs); waiting for <= {max_busy:.0%}")
        busy = cpu_busy(5.0)
    return busy


def run_rates(cfg: SweepConfig, name: str, base_url: str, log: Log,
              targets: Sequence[Target] = ()) -> tuple[tuple[RatePoint, ...], str | None]:
    """Every rate against `base_url` (warm-up before the first). Stops at the first setup failure.
    Each rate's phase breakdown scrapes `targets` (none given: whatever a pdserve proxy at `base_url`
    lists; nothing for other servers)."""
    points: list[RatePoint] = []
    for i, rate in enumerate(cfg.rates):
        bench = replace(cfg.bench, base_url=base_url, request_rate=rate, warmup=cfg.warmup if i == 0 else 0,
                        slos=cfg.headline.slos, prompt_stream=0 if i == 0 else i + 1)
        busy = wait_quiet(cfg.quiet_busy, cfg.quiet_timeout_s, log) if cfg.quiet_busy is not None else cpu_busy(1.0)
        try:
            result = asyncio.run(run_benchmark(bench, probe=PhaseProbe(targets, discover_from=base_url)))
        except (RuntimeError, OSError, aiohttp.ClientError) as e:  # setup failed (no /v1/models, refused)
            return tuple(points), f"rate {rate:g}: {type(e).__name__}: {e}"
        points.append(RatePoint.of(result, busy))
        m = result.metrics
        good = sum(1 for r in result.records if all(s.met(r) for s in cfg.headline.slos))
        ok = [r for r in result.records if r.success]  # p99 from the records: --percentiles may omit 99
        p99_ttft, p99_itl = (summarize(v, (99.0,)).percentile(99.0)
                             for v in ([r.ttft for r in ok if r.ttft is not None], [g for r in ok for g in r.itl]))
        log(f"  {name} @ {rate:g} req/s: {good}/{m.num_requests} meet {cfg.headline.name}, {m.failed} failed, "
            f"p99 TTFT {p99_ttft:.0f} ms, p99 ITL {p99_itl:.0f} ms, "
            f"{result.duration_s:.0f} s, busy before {_pct(busy)}, load avg after {points[-1].load_avg_1m:.1f}")
        if result.phases is not None and result.phases.skipped:
            log(f"  {name} @ {rate:g} req/s: phases skipped: {'; '.join(result.phases.skipped)}")
        if m.completed == 0:
            return tuple(points), f"rate {rate:g}: every request failed (e.g. {result.records[0].error[:200]})"
    return tuple(points), None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def run_topology(cfg: SweepConfig, name: str, log: Log, on_ready: Callable[[Topology], None] | None = None) -> Series:
    """Start topology `name`, run every rate against it, stop it (always). `on_ready` is called with
    the started topology before the first rate (a benchmark's own measurement of it)."""
    from pdserve.launch import Topology, TopologyError, parse_topology

    spec = parse_topology(name, cfg.model, run_dir=str(Path(cfg.out_dir) / "logs" / name.replace(":", "-")),
                          engine_args=cfg.engine_args, proxy_args=cfg.proxy_args,
                          startup_timeout_s=cfg.startup_timeout_s)
    log(f"starting {name} (logs in {spec.run_dir})")
    try:
        with Topology(spec) as topo:
            log(f"{name} ready at {topo.url}")
            if on_ready is not None:
                on_ready(topo)
            targets = (Target("proxy", "proxy", topo.url), *(Target(c.name, c.role, c.url) for c in topo.instances))
            points, error = run_rates(cfg, name, topo.url, log, targets)
            if error is None and (dead := topo.dead()):
                error = f"{dead[0].name} died during the sweep; log {dead[0].log_path}"
            return Series(name, "topology", topo.url, points, error)
    except TopologyError as e:
        return Series(name, "topology", "", (), str(e))


def run_sweep(cfg: SweepConfig, log: Log = print) -> tuple[Series, ...]:
    """Every topology, then every external endpoint; a series that fails is recorded, not raised."""
    out: list[Series] = []
    for name in cfg.topologies:
        out.append(run_topology(cfg, name, log))
        if out[-1].error:
            log(f"{name}: {out[-1].error.splitlines()[0]}")
    for name, url in cfg.external:
        log(f"sweeping external endpoint {name} at {url}")
        points, error = run_rates(cfg, name, url, log)
        out.append(Series(name, "external", url, points, error))
    return tuple(out)
