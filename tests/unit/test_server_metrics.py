"""The Prometheus registry's text output and the per-request timer."""

from __future__ import annotations

import pytest

from pdserve.engine.engine import EngineStats
from pdserve.engine.outputs import StepOutput
from pdserve.engine.spec.stats import SpecDecodeStats
from pdserve.server.metrics import RequestTimer, ServerMetrics
from pdserve.server.prometheus import Counter, Gauge, Histogram, Registry


def samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_counter_gauge_histogram_text() -> None:
    r = Registry()
    c = r.register(Counter("x_total", "Xs.", ("kind",)))
    r.register(Gauge("g", "A gauge.", lambda: 2.5))
    h = r.register(Histogram("h_seconds", "Hist.", (0.1, 1.0)))
    c.inc(labels=("a",))
    c.inc(2, labels=('q"\\\n',))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    text = r.render()
    assert "# TYPE x_total counter" in text and "# HELP g A gauge." in text and "# TYPE h_seconds histogram" in text
    s = samples(text)
    assert s['x_total{kind="a"}'] == "1" and s['x_total{kind="q\\"\\\\\\n"}'] == "2"
    assert s["g"] == "2.5"
    assert s['h_seconds_bucket{le="0.1"}'] == "2"  # le is inclusive
    assert s['h_seconds_bucket{le="1"}'] == "3"
    assert s['h_seconds_bucket{le="+Inf"}'] == "4"
    assert s["h_seconds_count"] == "4" and float(s["h_seconds_sum"]) == pytest.approx(3.65)


def test_registry_rules() -> None:
    r = Registry()
    r.register(Counter("a_total", "A."))
    with pytest.raises(ValueError):
        r.register(Counter("a_total", "A again."))
    with pytest.raises(ValueError):
        Counter("b_total", "B.").inc(-1)


def test_registries_are_independent() -> None:
    stats = EngineStats(num_running=1, num_waiting=2, num_free_blocks=3, num_total_blocks=4)
    m1, m2 = ServerMetrics(lambda: stats, lambda: 5), ServerMetrics(lambda: stats, lambda: 0)
    m1.generation_tokens.inc(10)
    s1, s2 = samples(m1.render()), samples(m2.render())
    assert s1["pdserve_generation_tokens_total"] == "10" and s2["pdserve_generation_tokens_total"] == "0"
    assert (s1["pdserve_num_requests_running"], s1["pdserve_num_requests_waiting"]) == ("1", "2")
    assert (s1["pdserve_kv_blocks_free"], s1["pdserve_kv_blocks_total"]) == ("3", "4")
    assert s1["pdserve_num_requests_in_flight"] == "5"


def test_request_timer() -> None:
    m = ServerMetrics(lambda: EngineStats(0, 0, 0, 0), lambda: 0)
    t = RequestTimer(m)
    t.observe(StepOutput("r", [1], "a", False, num_prompt_tokens=7, num_output_tokens=1))
    t.observe(StepOutput("r", [2, 3], "bc", False, num_prompt_tokens=7, num_output_tokens=3))
    t.observe(StepOutput("r", [], "", False))  # no tokens: no inter-token sample
    t.observe(StepOutput("r", [4], "d", True, "length", num_prompt_tokens=7, num_output_tokens=4))
    assert m.ttft.count == 1 and m.itl.count == 3 and m.e2e.count == 1
    assert m.generation_tokens.value() == 4 and m.prompt_tokens.value() == 7
    assert m.requests.value(("length",)) == 1


def test_spec_decode_counters_only_with_speculative_decoding() -> None:
    names = ("pdserve_spec_decode_num_drafts_total", "pdserve_spec_decode_num_draft_tokens_total",
             "pdserve_spec_decode_num_accepted_tokens_total")
    off = samples(ServerMetrics(lambda: EngineStats(0, 0, 8, 8), lambda: 0).render())
    assert not set(names) & set(off)
    stats = EngineStats(0, 0, 8, 8, spec_decode=SpecDecodeStats(3, 10, 7))
    text = ServerMetrics(lambda: stats, lambda: 0).render()
    assert "# TYPE pdserve_spec_decode_num_drafts_total counter" in text
    assert [samples(text)[n] for n in names] == ["3", "10", "7"]
    spec = stats.spec_decode
    assert spec.acceptance_rate == 0.7 and spec.mean_acceptance_length == pytest.approx(10 / 3)
