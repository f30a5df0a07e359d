"""Analysis of a sweep: attainment curves and DistServe goodput per SLO set, the headline row of
each series at one rate, the Markdown table shaped like the seed article's, and the JSON.

Two goodputs are reported, because the article's "relative goodput" row is the ratio of requests
meeting both SLOs at its headline rate (8 req/s), while DistServe defines goodput as the highest
rate whose attainment stays >= 90%: `relative` is good req/s at the headline rate divided by the
baseline's, `distserve` the interpolated rate (see goodput.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.bench.client import RequestRecord
from pdserve.bench.goodput import AttainmentPoint, DistServeGoodput, FailureMode, distserve_goodput
from pdserve.bench.goodput import primary_failure_mode as _primary
from pdserve.bench.metrics import SLO
from pdserve.bench.phase_report import PhaseRun, phase_table
from pdserve.bench.phases import Breakdown
from pdserve.bench.report import JsonValue, result_json
from pdserve.bench.sweep import RatePoint, Series, SLOSet, SweepConfig


def good_count(point: RatePoint, slos: Sequence[SLO]) -> int:
    return sum(1 for r in point.records if r.success and all(s.met(r) for s in slos))


def attainment_curve(points: Sequence[RatePoint], slos: Sequence[SLO]) -> tuple[AttainmentPoint, ...]:
    """(rate, fraction of all requests meeting every criterion), by rate."""
    return tuple(AttainmentPoint(p.rate, good_count(p, slos) / len(p.records)) for p in points if p.records)


@dataclass(frozen=True)
class HeadlineCell:
    """One series at the headline rate."""

    rate: float
    good: int  # meeting the headline set
    total: int
    failed: int
    request_goodput: float  # good / duration (vLLM's definition), req/s
    failure: FailureMode | None
    p99_itl_ms: float  # every inter-token gap of every successful request pooled (vLLM's P99 ITL)
    p99_ttft_ms: float
    per_set_good: tuple[tuple[str, int], ...]  # every SLO set: requests meeting it
    load_avg_1m: float | None = None  # the machine's load average after the run (other work on it)
    cached_share: float = 0.0  # of the successful requests' prompt tokens, found in the prefix cache


@dataclass(frozen=True)
class SeriesSummary:
    name: str
    curves: tuple[tuple[str, tuple[AttainmentPoint, ...]], ...]  # per SLO set
    goodput: tuple[tuple[str, DistServeGoodput | None], ...]  # per SLO set; None: nothing measured
    headline: HeadlineCell | None
    error: str | None
    phases: tuple[tuple[float, Breakdown], ...] = ()  # (rate, breakdown) of each rate that has one

    def curve(self, set_name: str) -> tuple[AttainmentPoint, ...]:
        return dict(self.curves)[set_name]

    def goodput_of(self, set_name: str) -> DistServeGoodput | None:
        return dict(self.goodput).get(set_name)


def _p99_ms(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, 99)) if len(values) else math.nan


def headline_cell(point: RatePoint, slo_sets: Sequence[SLOSet], headline: SLOSet) -> HeadlineCell:
    ok = [r for r in point.records if r.success]
    good = good_count(point, headline.slos)
    return HeadlineCell(
        rate=point.rate, good=good, total=len(point.records), failed=len(point.records) - len(ok),
        request_goodput=good / point.duration_s if point.duration_s > 0 else 0.0,
        failure=_primary(point.records, headline.slos),
        p99_itl_ms=_p99_ms([g for r in ok for g in r.itl]),
        p99_ttft_ms=_p99_ms([r.ttft for r in ok if r.ttft is not None]),
        per_set_good=tuple((s.name, good_count(point, s.slos)) for s in slo_sets),
        load_avg_1m=point.load_avg_1m,
        cached_share=sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_len for r in ok)),
    )


def summarize_series(series: Series, slo_sets: Sequence[SLOSet], headline: SLOSet, headline_rate: float,
                     target: float = 0.9) -> SeriesSummary:
    curves = tuple((s.name, attainment_curve(series.points, s.slos)) for s in slo_sets)
    goodput = tuple((name, distserve_goodput(c, target) if c else None) for name, c in curves)
    point = series.at(headline_rate)
    cell = headline_cell(point, slo_sets, headline) if point is not None and point.records else None
    phases = tuple((p.rate, p.phases) for p in series.points if p.phases is not None)
    return SeriesSummary(series.name, curves, goodput, cell, series.error, phases)


def summarize(cfg: SweepConfig, series: Sequence[Series]) -> tuple[SeriesSummary, ...]:
    rate = cfg.chosen_headline_rate
    return tuple(summarize_series(s, cfg.slo_sets, cfg.headline, rate) for s in series)


def _ratio(x: float | None, base: float | None) -> str:
    if x is None or base is None:
        return "n/a"
    if base <= 0:
        return "n/a (baseline 0)"
    return f"{x / base:.2g}x"


def _goodput_ratio(g: DistServeGoodput | None, base: DistServeGoodput | None, lowest: float) -> str:
    """g / base, with bounds: a goodput below the lowest rate is < lowest, a lower bound is >=."""
    if g is None or base is None:
        return "n/a"
    if g is base:
        return "1x"
    if base.below_range:
        return "n/a (both below range)" if g.below_range else f"> {g.rate / lowest:.2g}x"
    if g.below_range:
        return f"< {lowest / base.rate:.2g}x"
    bound = {(True, False): ">= ", (False, True): "<= ", (True, True): "~"}.get((g.lower_bound, base.lower_bound), "")
    return f"{bound}{g.rate / base.rate:.2g}x"


def _goodput_text(g: DistServeGoodput | None) -> str:
    if g is None:
        return "n/a"
    if g.below_range:
        return "< lowest rate"
    return f"{'>= ' if g.lower_bound else ''}{g.rate:.2f}"


def _failure_text(f: FailureMode | None) -> str:
    return "none (all good)" if f is None else f"{f.label} ({f.count} of {f.bad} bad)"


def markdown_summary(cfg: SweepConfig, summaries: Sequence[SeriesSummary]) -> str:
    """The headline table (the article's Table 3 shape), DistServe goodput per SLO set, attainment
    per rate; a series without a point at the headline rate shows n/a."""
    rate, head = cfg.chosen_headline_rate, cfg.headline
    w = cfg.bench.workload
    base = next((s for s in summaries if s.name == cfg.baseline), None)
    base_cell = base.headline if base else None
    base_gp = base.goodput_of(head.name) if base else None
    cols = [s.name for s in summaries]
    lines = [
        f"Headline: {rate:g} req/s; SLOs {head.describe()}; {w.num_prompts} requests per rate, "
        f"{w.describe()}{_endpoint(cfg)}; baseline {cfg.baseline}.",
        "",
        "| Metric | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]

    def row(label: str, cells: Sequence[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    cells = [s.headline for s in summaries]
    row(f"Requests meeting both SLOs at {rate:g} req/s", [f"{c.good}/{c.total}" if c else "n/a" for c in cells])
    row("Primary failure mode", [_failure_text(c.failure) if c else "n/a" for c in cells])
    row(f"Relative goodput (good req/s at {rate:g} req/s vs {cfg.baseline})",
        [_ratio(c.request_goodput if c else None, base_cell.request_goodput if base_cell else None) for c in cells])
    gps = [s.goodput_of(head.name) for s in summaries]
    row("DistServe goodput (req/s at >= 90% attainment)", [_goodput_text(g) for g in gps])
    row(f"Relative DistServe goodput (vs {cfg.baseline})", [_goodput_ratio(g, base_gp, min(cfg.rates)) for g in gps])
    row(f"P99 ITL, all gaps pooled (ms) at {rate:g} req/s", [f"{c.p99_itl_ms:.0f}" if c else "n/a" for c in cells])
    row(f"P99 TTFT (ms) at {rate:g} req/s", [f"{c.p99_ttft_ms:.0f}" if c else "n/a" for c in cells])
    for s in cfg.slo_sets:
        if s.name != head.name:
            row(f"Meeting {s.name} ({s.spec()}) at {rate:g} req/s",
                [f"{dict(c.per_set_good)[s.name]}/{c.total}" if c else "n/a" for c in cells])
    if any(c and c.cached_share for c in cells):
        row(f"Prompt tokens from the prefix cache at {rate:g} req/s",
            [f"{c.cached_share:.0%}" if c else "n/a" for c in cells])
    if any(c and c.failed for c in cells):
        row("Failed requests", [str(c.failed) if c else "n/a" for c in cells])
    if any(c and c.load_avg_1m is not None for c in cells):
        row("Machine load average (1 min) after that run",
            [f"{c.load_avg_1m:.1f}" if c and c.load_avg_1m is not None else "n/a" for c in cells])
    lines += ["", "DistServe goodput (req/s, highest rate with >= 90% of requests meeting every criterion):", "",
              "| SLO set | criteria | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for s in cfg.slo_sets:
        lines.append(f"| {s.name} | {s.spec()} | " + " | ".join(_goodput_text(x.goodput_of(s.name))
                                                                for x in summaries) + " |")
    lines += ["", f"Attainment of {head.name} ({head.spec()}) per rate:", "",
              "| rate (req/s) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in cfg.rates:
        vals = [next((f"{p.attainment:.0%}" for p in s.curve(head.name) if math.isclose(p.rate, r)), "-")
                for s in summaries]
        lines.append(f"| {r:g} | " + " | ".join(vals) + " |")
    if table := phase_table(phase_runs(summaries)):
        lines += ["", table.rstrip("\n")]
    errors = [f"- {s.name}: {s.error.splitlines()[0]}" for s in summaries if s.error]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def phase_runs(summaries: Sequence[SeriesSummary]) -> list[PhaseRun]:
    """(series, rate, breakdown) of every rate that has one: the phase table's and figure's input."""
    return [(s.name, rate, b) for s in summaries for rate, b in s.phases]


def _goodput_json(g: DistServeGoodput | None) -> JsonValue:
    if g is None:
        return None
    return {"rate": g.rate, "target": g.target, "lower_bound": g.lower_bound, "below_range": g.below_range}


def _cell_json(c: HeadlineCell | None) -> JsonValue:
    if c is None:
        return None
    f = c.failure
    return {"rate": c.rate, "good": c.good, "total": c.total, "failed": c.failed, "request_goodput": c.request_goodput,
            "primary_failure_mode": None if f is None else {"label": f.label, "count": f.count, "bad": f.bad},
            "p99_itl_ms": _finite(c.p99_itl_ms), "p99_ttft_ms": _finite(c.p99_ttft_ms),
            "good_per_slo_set": dict(c.per_set_good), "load_avg_1m": c.load_avg_1m}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def sweep_json(cfg: SweepConfig, series: Sequence[Series], summaries: Sequence[SeriesSummary]) -> dict[str, JsonValue]:
    """Config, per-series summary, and every per-rate bench result (vLLM field names, see report.py)."""
    w = cfg.bench.workload
    return {
        "model": cfg.model,
        "rates": list(cfg.rates),
        "headline_rate": cfg.chosen_headline_rate,
        "headline_slo_set": cfg.headline_set,
        "baseline": cfg.baseline,
        "slo_sets": {s.name: [{"name": x.name, "threshold_ms": x.threshold_ms} for x in s.slos] for s in cfg.slo_sets},
        "workload": {"num_prompts": w.num_prompts, "input_len": w.input_len, "output_len": w.output_len,
                     "range_ratio": w.range_ratio, "prefix_len": w.prefix_len,
                     "num_prefixes": w.num_prefixes, "seed": w.seed, "dataset_name": w.dataset_name,
                     "dataset_path": w.dataset_path, "sharegpt_output_len": w.sharegpt_output_len,
                     "custom_output_len": w.custom_output_len, "endpoint_type": cfg.bench.endpoint_type},
        "warmup": cfg.warmup,
        "engine_args": list(cfg.engine_args),
        "series": [
            {
                "name": s.name, "kind": s.kind, "base_url": s.base_url, "error": s.error,
                "attainment": {n: [[p.rate, p.attainment] for p in c] for n, c in m.curves},
                "distserve_goodput": {n: _goodput_json(g) for n, g in m.goodput},
                "headline": _cell_json(m.headline),
                "runs": [_rounded(result_json(p.result) | {"load_avg_1m": p.load_avg_1m,
                                                            "cpu_busy_before": p.busy_before})
                         for p in s.points if p.result is not None],
            }
            for s, m in zip(series, summaries, strict=True)
        ],
    }


def _rounded(obj: JsonValue) -> JsonValue:
    """Floats to 6 decimals (1 us for times in seconds): a sweep's JSON is mostly token gaps."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, list):
        return [_rounded(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def _record(req: dict, output_len: int) -> RequestRecord:
    send = float(req["start_time"])
    chunks: list[float] = []
    if req["success"] and req["ttft"] is not None:
        chunks = [send + req["ttft"]]
        for gap in req["itl"]:
            chunks.append(chunks[-1] + gap)
    return RequestRecord(
        index=req["index"], prompt_len=req["prompt_len"],
        expected_output_len=req.get("expected_output_len") or output_len,
        scheduled_time=send - float(req.get("queue_time") or 0.0), send_time=send,
        end_time=chunks[-1] if chunks else send, chunk_times=tuple(chunks), output_tokens=req["output_tokens"],
        success=bool(req["success"]), error=req.get("error") or "", cached_tokens=int(req.get("cached_tokens") or 0),
    )


def series_from_json(data: dict) -> tuple[Series, ...]:
    """The series of a results.json written by `sweep_json` (records rebuilt from the per-request
    times; `RatePoint.result` is None), to re-render the report with other SLOs or headline rate."""
    out_len = int(data["workload"]["output_len"])
    return tuple(
        Series(s["name"], s["kind"], s["base_url"], tuple(
            RatePoint(float(run["request_rate"]), tuple(_record(r, out_len) for r in run["requests"]),
                      float(run["duration"]), None, run.get("load_avg_1m"), run.get("cpu_busy_before"),
                      Breakdown.from_json(run["phases"]) if run.get("phases") else None)
            for run in s["runs"]), s.get("error"))
        for s in data["series"]
    )


def _endpoint(cfg: SweepConfig) -> str:
    return "" if cfg.bench.endpoint_type == "completions" else f", {cfg.bench.endpoint_type} endpoint"
