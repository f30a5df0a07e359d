"""DistServe goodput interpolation and the primary failure mode of a run."""

from __future__ import annotations

import pytest

from pdserve.bench.client import RequestRecord
from pdserve.bench.goodput import AttainmentPoint, distserve_goodput, primary_failure_mode
from pdserve.bench.metrics import parse_slos
from tests.unit.test_bench_metrics import failed, rec


def pts(*pairs: tuple[float, float]) -> list[AttainmentPoint]:
    return [AttainmentPoint(rate, att) for rate, att in pairs]


def test_interpolates_between_last_above_and_first_below() -> None:
    g = distserve_goodput(pts((1, 1.0), (2, 0.95), (3, 0.85), (4, 0.5)))
    assert g.rate == pytest.approx(2.5)  # 0.95 -> 0.85 crosses 0.9 halfway
    assert not g.lower_bound and not g.below_range


def test_exact_target_point_counts_as_meeting() -> None:
    assert distserve_goodput(pts((1, 1.0), (2, 0.9), (3, 0.4))).rate == pytest.approx(2.0)


def test_unsorted_input_is_sorted_by_rate() -> None:
    assert distserve_goodput(pts((4, 0.5), (2, 0.95), (1, 1.0), (3, 0.85))).rate == pytest.approx(2.5)


def test_none_good_is_zero() -> None:
    g = distserve_goodput(pts((0.5, 0.3), (1, 0.2)))
    assert g.rate == 0.0 and g.below_range and not g.lower_bound
    assert "below the lowest rate" in g.describe()


def test_all_good_is_max_rate_and_a_lower_bound() -> None:
    g = distserve_goodput(pts((1, 1.0), (2, 0.99), (8, 0.93)))
    assert g.rate == 8 and g.lower_bound and not g.below_range
    assert g.describe().startswith(">= 8.00 req/s")


def test_non_monotone_takes_first_crossing() -> None:
    # dips below at 3, recovers at 4 (noise): the first crossing wins
    g = distserve_goodput(pts((1, 1.0), (2, 1.0), (3, 0.8), (4, 0.95), (5, 0.2)))
    assert g.rate == pytest.approx(2.5)


def test_custom_target() -> None:
    assert distserve_goodput(pts((1, 1.0), (2, 0.6)), target=0.8).rate == pytest.approx(1.5)


def test_single_point() -> None:
    assert distserve_goodput(pts((3, 0.95))).rate == 3 and distserve_goodput(pts((3, 0.95))).lower_bound
    assert distserve_goodput(pts((3, 0.5))).below_range


@pytest.mark.parametrize(
    "bad",
    [[], pts((1, 1.0), (1, 0.5)), pts((0, 1.0)), pts((1, 1.5)), pts((float("inf"), 1.0))],
)
def test_rejects_bad_sweeps(bad: list[AttainmentPoint]) -> None:
    with pytest.raises(ValueError):
        distserve_goodput(bad)


def test_rejects_bad_target() -> None:
    with pytest.raises(ValueError):
        distserve_goodput(pts((1, 1.0)), target=0.0)


# --- primary failure mode ------------------------------------------------------------------

SLOS = parse_slos(["ttft:1000", "itl_p99:50"])


def _itl_spiky(i: int) -> RequestRecord:
    return rec([0.1, 0.3, 0.5], index=i)  # 200 ms gaps


def test_primary_failure_mode_itl() -> None:
    records = [_itl_spiky(i) for i in range(5)] + [rec([2.0, 2.01], index=9), rec([0.1, 0.11], index=10)]
    f = primary_failure_mode(records, SLOS)
    assert f is not None
    assert (f.label, f.count, f.bad) == ("ITL p99 > 50 ms", 5, 6)
    assert dict(f.counts) == {"ITL p99 > 50 ms": 5, "TTFT > 1000 ms": 1}


def test_primary_failure_mode_ttft_and_errors() -> None:
    records = [rec([2.0, 2.01], index=i) for i in range(3)] + [failed(7)]
    f = primary_failure_mode(records, SLOS)
    assert f is not None and f.label == "TTFT > 1000 ms" and f.bad == 4
    g = primary_failure_mode([failed(0), failed(1), rec([2.0], index=2)], SLOS)
    assert g is not None and (g.label, g.count) == ("errors", 2)


def test_failure_mode_tie_prefers_errors_then_slo_order() -> None:
    assert primary_failure_mode([failed(0), rec([2.0], index=1)], SLOS).label == "errors"  # type: ignore[union-attr]
    both = [rec([2.0, 2.2], index=0)]  # misses both criteria, once each
    assert primary_failure_mode(both, SLOS).label == "TTFT > 1000 ms"  # type: ignore[union-attr]


def test_no_failure_mode_when_all_good() -> None:
    assert primary_failure_mode([rec([0.1, 0.11])], SLOS) is None
    assert primary_failure_mode([], SLOS) is None
