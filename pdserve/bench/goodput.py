"""DistServe goodput over a rate sweep, and the primary failure mode of one run.

DistServe goodput = the highest request rate whose SLO attainment is >= target (0.9), linearly
interpolated between the last tested rate at or above target and the first one below it. On a
non-monotone curve the first crossing (lowest rate) wins. If even the lowest rate misses the
target the goodput is 0.0; if every rate meets it, it is the highest rate tested, flagged as a
lower bound (the sweep did not reach the knee).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.bench.client import RequestRecord
from pdserve.bench.metrics import SLO, violations

DEFAULT_TARGET = 0.9
ERRORS = "errors"


@dataclass(frozen=True)
class AttainmentPoint:
    rate: float  # requests/s offered
    attainment: float  # fraction of all requests that were good, in [0, 1]


@dataclass(frozen=True)
class DistServeGoodput:
    rate: float  # req/s; 0.0 when even the lowest rate tested misses the target
    target: float
    lower_bound: bool  # every rate met the target: the true goodput is at least `rate`
    below_range: bool  # no rate met the target: the true goodput is below the lowest rate tested

    def describe(self) -> str:
        if self.below_range:
            return f"0 req/s (below the lowest rate tested at {self.target:.0%} attainment)"
        return f"{'>= ' if self.lower_bound else ''}{self.rate:.2f} req/s at {self.target:.0%} attainment"


def distserve_goodput(points: Sequence[AttainmentPoint], target: float = DEFAULT_TARGET) -> DistServeGoodput:
    if not points:
        raise ValueError("no (rate, attainment) points")
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    pts = sorted(points, key=lambda p: p.rate)
    for p in pts:
        if not (math.isfinite(p.rate) and p.rate > 0) or not 0 <= p.attainment <= 1:
            raise ValueError(f"bad point {p}: need a finite rate > 0 and attainment in [0, 1]")
    rates = [p.rate for p in pts]
    if len(set(rates)) != len(rates):
        raise ValueError(f"duplicate rates in sweep: {rates}")
    if pts[0].attainment < target:
        return DistServeGoodput(0.0, target, lower_bound=False, below_range=True)
    for above, below in zip(pts[:-1], pts[1:], strict=True):
        if below.attainment < target:
            frac = (above.attainment - target) / (above.attainment - below.attainment)
            rate = above.rate + frac * (below.rate - above.rate)
            return DistServeGoodput(rate, target, lower_bound=False, below_range=False)
    return DistServeGoodput(pts[-1].rate, target, lower_bound=True, below_range=False)


@dataclass(frozen=True)
class FailureMode:
    label: str  # e.g. "ITL p99 > 50 ms", "TTFT > 1000 ms", "errors"
    count: int  # bad requests with this failure
    bad: int  # all bad requests
    counts: tuple[tuple[str, int], ...]  # every failure label, most frequent first


def primary_failure_mode(records: Sequence[RequestRecord], slos: Sequence[SLO]) -> FailureMode | None:
    """Which criterion fails most among the bad requests (a failed request counts as "errors").

    A request missing several criteria counts once for each; ties go to errors, then to the order
    the SLOs were given in. None when every request is good.
    """
    order = [ERRORS] + [s.violation() for s in slos]
    counts: Counter[str] = Counter()
    bad = 0
    for rec in records:
        missed = [ERRORS] if not rec.success else [s.violation() for s in violations(rec, slos)]
        if missed:
            bad += 1
            counts.update(missed)
    if not bad:
        return None
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], order.index(kv[0])))
    return FailureMode(label=ranked[0][0], count=ranked[0][1], bad=bad, counts=tuple(ranked))
