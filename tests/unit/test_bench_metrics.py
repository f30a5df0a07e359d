"""Aggregate metrics, SLO parsing, attainment and vLLM's request_goodput on synthetic records."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from pdserve.bench.client import RequestRecord
from pdserve.bench.metrics import SLO, compute_metrics, is_good, parse_slo, parse_slos, summarize, violations


def rec(
    chunks: Sequence[float] = (),
    *,
    send: float = 0.0,
    tokens: int | None = None,
    success: bool = True,
    error: str = "",
    index: int = 0,
    prompt_len: int = 8,
) -> RequestRecord:
    """A record whose chunks arrive at the given times (seconds; send at `send`)."""
    return RequestRecord(
        index=index,
        prompt_len=prompt_len,
        expected_output_len=tokens if tokens is not None else len(chunks),
        scheduled_time=send,
        send_time=send,
        end_time=chunks[-1] if chunks else send,
        chunk_times=tuple(chunks),
        output_tokens=tokens if tokens is not None else len(chunks),
        success=success,
        error=error,
    )


def failed(index: int = 0, send: float = 0.0) -> RequestRecord:
    return rec(success=False, error="HTTP 500 Internal Server Error", index=index, send=send)


# --- per-request derived values ------------------------------------------------------------


def test_record_derived_values() -> None:
    r = rec([1.0, 1.05, 1.2, 1.25], send=0.5)
    assert r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx((0.05, 0.15, 0.05))
    assert r.e2el == pytest.approx(0.75)
    assert r.tpot == pytest.approx(0.25 / 3)


def test_multi_token_chunk_tpot_uses_token_count_itl_uses_chunks() -> None:
    r = rec([1.0, 1.2], tokens=5)  # 5 tokens in two chunks
    assert r.itl == pytest.approx((0.2,))
    assert r.tpot == pytest.approx(0.2 / 4)


def test_single_token_output_has_empty_itl_and_zero_tpot() -> None:
    r = rec([0.3])
    assert r.itl == () and r.tpot == 0.0 and r.ttft == pytest.approx(0.3)


# --- SLO parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "kind", "pct", "ms", "label"),
    [
        ("ttft:1000", "ttft", "ttft", 100.0, 1000.0, "TTFT"),
        ("tpot:50", "tpot", "tpot", 100.0, 50.0, "TPOT"),
        ("e2el:5000", "e2el", "e2el", 100.0, 5000.0, "E2EL"),
        ("itl_p99:50", "itl_p99", "itl_pct", 99.0, 50.0, "ITL p99"),
        ("itl_p99.9:50.5", "itl_p99.9", "itl_pct", 99.9, 50.5, "ITL p99.9"),
        ("itl_max:50", "itl_max", "itl_pct", 100.0, 50.0, "ITL max"),
        ("itl_mean:20", "itl_mean", "itl_mean", 100.0, 20.0, "ITL mean"),
        (" TTFT : 1e3 ", "ttft", "ttft", 100.0, 1000.0, "TTFT"),
    ],
)
def test_parse_slo(text: str, name: str, kind: str, pct: float, ms: float, label: str) -> None:
    slo = parse_slo(text)
    assert (slo.name, slo.kind, slo.percentile, slo.threshold_ms, slo.label) == (name, kind, pct, ms, label)


@pytest.mark.parametrize(
    "text",
    ["ttft", "ttft:", "ttft:abc", "itl:50", "latency:3", "itl_p101:5", "ttft:-1", "ttft:inf", ":50", ""],
)
def test_parse_slo_rejects_and_names_the_criterion(text: str) -> None:
    with pytest.raises(ValueError, match="bad SLO criterion") as info:
        parse_slo(text)
    assert repr(text) in str(info.value)


def test_parse_slos_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="ttft"):
        parse_slos(["ttft:1", "itl_p99:5", "ttft:2"])
    assert [s.name for s in parse_slos(["ttft:1", "itl_max:5"])] == ["ttft", "itl_max"]


def test_violation_text() -> None:
    assert parse_slo("itl_p99:50").violation() == "ITL p99 > 50 ms"
    assert parse_slo("ttft:1000").violation() == "TTFT > 1000 ms"


# --- per-request good / bad ----------------------------------------------------------------


def _gappy(send: float = 0.0) -> RequestRecord:
    # ttft 0.2 s; 100 gaps of 10 ms except two of 120 ms -> p99 ~ 118.9 ms, max 120, mean ~12.2
    gaps = [0.01] * 98 + [0.12, 0.12]
    return rec(np.cumsum([send + 0.2, *gaps]).tolist(), send=send)


def test_itl_criteria_are_per_request_statistics() -> None:
    r = _gappy()
    assert parse_slo("itl_max:119").value_ms(r) == pytest.approx(120.0)
    assert parse_slo("itl_p99:1").value_ms(r) == pytest.approx(float(np.percentile(r.itl, 99)) * 1e3)
    assert parse_slo("itl_p50:1").value_ms(r) == pytest.approx(10.0)
    assert parse_slo("itl_mean:1").value_ms(r) == pytest.approx(float(np.mean(r.itl)) * 1e3)
    assert not is_good(r, [parse_slo("itl_max:119")])
    assert is_good(r, [parse_slo("itl_max:120.001")])
    assert is_good(rec([0.5, 1.0]), parse_slos(["ttft:500", "itl_max:500"]))  # inclusive, as vLLM
    assert is_good(r, [parse_slo("itl_p50:10.001"), parse_slo("ttft:200")])
    assert [s.name for s in violations(r, parse_slos(["ttft:100", "itl_p99:50", "itl_p50:50"]))] == [
        "ttft",
        "itl_p99",
    ]


def test_empty_itl_meets_itl_criteria() -> None:
    r = rec([0.1])  # output_len 1
    slos = parse_slos(["itl_p99:1", "itl_max:1", "itl_mean:1", "tpot:1"])
    assert is_good(r, slos)
    assert parse_slo("itl_max:1").value_ms(r) == 0.0


def test_failed_request_is_never_good() -> None:
    assert not is_good(failed(), [])
    assert not is_good(failed(), parse_slos(["ttft:1e9"]))
    assert parse_slo("ttft:1").value_ms(failed()) is None


# --- aggregates ----------------------------------------------------------------------------


def test_compute_metrics_matches_vllm_definitions() -> None:
    records = [
        rec([0.1, 0.2, 0.3], send=0.0, index=0, prompt_len=10),
        rec([1.5, 1.7], send=1.0, tokens=4, index=1, prompt_len=20),  # one 3-token chunk
        rec([2.4], send=2.0, index=2, prompt_len=30),  # single token: no TPOT, no ITL
        failed(index=3),
    ]
    m = compute_metrics(records, duration_s=4.0, percentiles=(50, 99))
    assert (m.num_requests, m.completed, m.failed) == (4, 3, 1)
    assert (m.total_input, m.total_output) == (60, 3 + 4 + 1)
    assert m.request_throughput == pytest.approx(3 / 4)
    assert m.output_throughput == pytest.approx(8 / 4)
    assert m.total_token_throughput == pytest.approx(68 / 4)
    assert m.request_goodput is None  # no SLO given
    assert m.good == (True, True, True, False) and m.attainment == pytest.approx(0.75)
    ttfts = [100.0, 500.0, 400.0]
    assert m.ttft.mean_ms == pytest.approx(np.mean(ttfts))
    assert m.ttft.median_ms == pytest.approx(400.0)
    assert m.ttft.std_ms == pytest.approx(np.std(ttfts))
    assert m.ttft.percentile(99) == pytest.approx(np.percentile(ttfts, 99))
    assert m.itl.mean_ms == pytest.approx(np.mean([100.0, 100.0, 200.0]))
    assert m.tpot.mean_ms == pytest.approx(np.mean([100.0, 200.0 / 3]))  # single-token request excluded
    assert m.e2el.median_ms == pytest.approx(400.0)
    assert m.max_concurrent_requests == 1
    assert m.max_output_tokens_per_s == 3.0


def test_goodput_and_attainment_with_slos() -> None:
    records = [
        rec([0.1, 0.12, 0.14], index=0),  # good
        rec([0.1, 0.3, 0.32], index=1),  # 200 ms gap -> misses itl_max:50
        rec([2.0, 2.01], index=2),  # ttft 2 s -> misses ttft:1000
        failed(index=3),
    ]
    m = compute_metrics(records, duration_s=2.0, slos=parse_slos(["ttft:1000", "itl_max:50"]))
    assert m.good == (True, False, False, False)
    assert m.good_count == 1
    assert m.attainment == pytest.approx(0.25)
    assert m.request_goodput == pytest.approx(1 / 2.0)


def test_no_request_good() -> None:
    records = [rec([2.0, 2.5], index=i) for i in range(3)]
    m = compute_metrics(records, 5.0, slos=[parse_slo("ttft:100")])
    assert m.good_count == 0 and m.attainment == 0.0 and m.request_goodput == 0.0


def test_all_good() -> None:
    records = [rec([0.01 * (i + 1), 0.02 * (i + 1)], index=i) for i in range(4)]
    m = compute_metrics(records, 2.0, slos=parse_slos(["ttft:1000", "itl_p99:50", "tpot:50", "e2el:5000"]))
    assert m.attainment == 1.0 and m.request_goodput == pytest.approx(2.0)


def test_all_failed_gives_zeros_not_errors() -> None:
    m = compute_metrics([failed(0), failed(1)], 1.0, slos=[parse_slo("ttft:1")])
    assert (m.completed, m.failed, m.total_output) == (0, 2, 0)
    assert m.ttft.mean_ms == 0.0 and m.itl.percentile(99) == 0.0
    assert m.attainment == 0.0 and m.request_goodput == 0.0
    assert m.max_concurrent_requests == 0 and m.max_output_tokens_per_s == 0.0


def test_output_len_one_everywhere_gives_empty_itl() -> None:
    m = compute_metrics([rec([0.2], index=i) for i in range(3)], 1.0, slos=[parse_slo("itl_p99:1")])
    assert m.itl.mean_ms == 0.0 and m.tpot.mean_ms == 0.0 and m.attainment == 1.0


def test_no_requests() -> None:
    m = compute_metrics([], 1.0)
    assert m.num_requests == 0 and m.attainment == 0.0 and m.request_throughput == 0.0


def test_peak_concurrency() -> None:
    records = [rec([1.0], send=0.0, index=0), rec([1.5], send=0.5, index=1), rec([3.0], send=1.0, index=2)]
    assert compute_metrics(records, 3.0).max_concurrent_requests == 2  # [0,1) and [0.5,1.5); 1.0 ends first


def test_bad_duration() -> None:
    with pytest.raises(ValueError):
        compute_metrics([], 0.0)


def test_summarize_custom_percentiles() -> None:
    d = summarize([0.001 * i for i in range(1, 101)], (25, 99.9))
    assert d.percentiles_ms == ((25.0, pytest.approx(25.75)), (99.9, pytest.approx(99.901)))


def test_slo_is_frozen() -> None:
    slo = SLO("ttft", 1.0, "ttft")
    with pytest.raises(AttributeError):
        slo.threshold_ms = 2.0  # type: ignore[misc]
