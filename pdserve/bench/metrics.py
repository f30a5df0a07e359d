"""Aggregate metrics of one run and per-request SLO checks.

Definitions follow vLLM's `vllm bench serve`: statistics are over successful requests; TTFT, E2EL
and TPOT have one value per request, ITL pools every inter-chunk gap of every request; an empty
list counts as 0. A request is *good* when it succeeded and meets every SLO (value <= threshold);
`request_goodput` = good requests / benchmark duration. Durations in records are seconds, every
aggregate is milliseconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pdserve.bench.client import RequestRecord

SLOKind = Literal["ttft", "tpot", "e2el", "itl_pct", "itl_mean"]
_SLO_NAME = re.compile(r"^(ttft|tpot|e2el|itl_max|itl_mean|itl_p(\d+(?:\.\d+)?))$")
_PLAIN_KINDS: dict[str, SLOKind] = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2el", "itl_mean": "itl_mean"}
SLO_NAMES_HELP = "ttft, tpot, e2el, itl_max, itl_mean, itl_pNN (e.g. itl_p99)"


@dataclass(frozen=True)
class SLO:
    """One criterion, e.g. `itl_p99:50` = the request's own p99 inter-token gap <= 50 ms."""

    name: str
    threshold_ms: float
    kind: SLOKind
    percentile: float = 100.0  # for kind itl_pct; itl_max is p100

    @property
    def label(self) -> str:
        if self.kind == "itl_pct":
            return "ITL max" if self.name == "itl_max" else f"ITL p{self.percentile:g}"
        return "ITL mean" if self.kind == "itl_mean" else self.kind.upper()

    def violation(self) -> str:
        return f"{self.label} > {self.threshold_ms:g} ms"

    def value_ms(self, rec: RequestRecord) -> float | None:
        """The request's value in ms (None for a failed request); no gaps -> ITL 0."""
        if not rec.success or rec.ttft is None or rec.e2el is None:
            return None
        if self.kind == "ttft":
            return rec.ttft * 1e3
        if self.kind == "tpot":
            return rec.tpot * 1e3
        if self.kind == "e2el":
            return rec.e2el * 1e3
        gaps = rec.itl
        if not gaps:
            return 0.0
        if self.kind == "itl_mean":
            return float(np.mean(gaps)) * 1e3
        return float(np.percentile(gaps, self.percentile)) * 1e3

    def met(self, rec: RequestRecord) -> bool:
        v = self.value_ms(rec)
        return v is not None and v <= self.threshold_ms

    def spec(self) -> str:
        return f"{self.name}:{self.threshold_ms:g}"


def parse_slo(text: str) -> SLO:
    """`name:ms`, e.g. `ttft:1000`, `itl_p99:50`; ValueError naming the bad criterion."""
    name, sep, value = text.strip().partition(":")
    name = name.strip().lower()
    m = _SLO_NAME.match(name)
    if not sep or not m:
        raise ValueError(f"bad SLO criterion {text!r}: expected NAME:MS with NAME one of {SLO_NAMES_HELP}")
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"bad SLO criterion {text!r}: {value.strip()!r} is not a number of ms") from None
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"bad SLO criterion {text!r}: threshold must be a finite number >= 0 ms")
    if name == "itl_max":
        return SLO(name, threshold, "itl_pct", 100.0)
    if m.group(2) is not None:
        pct = float(m.group(2))
        if not 0 <= pct <= 100:
            raise ValueError(f"bad SLO criterion {text!r}: percentile must be in [0, 100]")
        return SLO(name, threshold, "itl_pct", pct)
    return SLO(name, threshold, _PLAIN_KINDS[name])


def parse_slos(texts: Sequence[str]) -> tuple[SLO, ...]:
    slos = tuple(parse_slo(t) for t in texts)
    names = [s.name for s in slos]
    if dups := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"SLO criterion given twice: {', '.join(dups)}")
    return slos


def violations(rec: RequestRecord, slos: Sequence[SLO]) -> tuple[SLO, ...]:
    """The criteria a successful request misses (a failed request misses all of them)."""
    return tuple(s for s in slos if not s.met(rec))


def is_good(rec: RequestRecord, slos: Sequence[SLO]) -> bool:
    return rec.success and not violations(rec, slos)


@dataclass(frozen=True)
class Distribution:
    """Statistics of one latency in ms."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: tuple[tuple[float, float], ...]  # (percentile, value)

    def percentile(self, p: float) -> float:
        return dict(self.percentiles_ms)[p]


def summarize(values_s: Sequence[float], percentiles: Sequence[float]) -> Distribution:
    v = np.asarray(values_s, dtype=float) * 1e3 if len(values_s) else np.zeros(1)
    return Distribution(
        mean_ms=float(np.mean(v)),
        median_ms=float(np.median(v)),
        std_ms=float(np.std(v)),
        percentiles_ms=tuple((float(p), float(np.percentile(v, p))) for p in percentiles),
    )


@dataclass(frozen=True)
class BenchMetrics:
    num_requests: int
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration_s: float
    total_cached_input: int  # of total_input, found in the server's prefix cache (as its usage says)
    request_throughput: float
    request_goodput: float | None  # None when no SLO was given (as vLLM)
    output_throughput: float
    total_token_throughput: float
    good: tuple[bool, ...]  # per record, in order
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution
    max_output_tokens_per_s: float
    max_concurrent_requests: int

    @property
    def good_count(self) -> int:
        return sum(self.good)

    @property
    def attainment(self) -> float:
        """Fraction of all requests (failed ones included) that are good."""
        return self.good_count / self.num_requests if self.num_requests else 0.0


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    slos: Sequence[SLO] = (),
    percentiles: Sequence[float] = (50.0, 90.0, 99.0),
) -> BenchMetrics:
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    good = tuple(is_good(r, slos) for r in records)
    return BenchMetrics(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input=total_input,
        total_output=total_output,
        duration_s=duration_s,
        total_cached_input=sum(r.cached_tokens for r in ok),
        request_throughput=len(ok) / duration_s,
        request_goodput=sum(good) / duration_s if slos else None,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        good=good,
        ttft=summarize([r.ttft for r in ok if r.ttft is not None], percentiles),
        tpot=summarize([r.tpot for r in ok if r.output_tokens > 1], percentiles),
        itl=summarize([g for r in ok for g in r.itl], percentiles),
        e2el=summarize([r.e2el for r in ok if r.e2el is not None], percentiles),
        max_output_tokens_per_s=_peak_chunks_per_s(ok),
        max_concurrent_requests=_peak_concurrency(ok),
    )


def _peak_chunks_per_s(ok: Sequence[RequestRecord]) -> float:
    """Most token chunks arriving within one 1-second bucket (vLLM's peak output throughput)."""
    times = [t for r in ok for t in r.chunk_times]
    if not times:
        return 0.0
    t0 = min(r.send_time for r in ok)
    return float(np.bincount(np.floor(np.asarray(times) - t0).astype(np.int64)).max())


def _peak_concurrency(ok: Sequence[RequestRecord]) -> int:
    """Most successful requests in flight at once, over [send, last token) intervals."""
    events = sorted([(r.send_time, 1) for r in ok] + [(r.send_time + (r.e2el or 0.0), -1) for r in ok])
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak
