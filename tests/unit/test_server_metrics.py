"""The Prometheus registry's text output and the per-request timer."""

from __future__ import annotations

import pytest

from pdserve.engine.engine import EngineStats
from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec.stats import SpecDecodeStats
from pdserve.server.metrics import RequestTimer, ServerMetrics
from pdserve.server.prometheus import Alias, Counter, Gauge, Histogram, LabeledGauge, Registry
from pdserve.server.vllm_metrics import ChoiceGroup, VllmInfo, build_1_2_5_buckets


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


def test_const_labels_alias_and_labeled_gauge_text() -> None:
    r = Registry()
    labels = (("model_name", "m"), ("engine", "0"))
    h = r.register(Histogram("h_seconds", "Hist.", (0.1, 1.0), const_labels=labels))
    r.register(Alias("old_seconds", "Old name.", h))
    r.register(Gauge("g", "A gauge.", lambda: 3, const_labels=labels))
    r.register(LabeledGauge("info", "Info.", ("a", "b"), lambda: [(("x", "y"), 1.0)]))
    h.observe(0.5, 3)
    s = samples(r.render())
    assert s['h_seconds_bucket{model_name="m",engine="0",le="1"}'] == "3"
    assert s['h_seconds_count{model_name="m",engine="0"}'] == "3"
    assert s['h_seconds_sum{model_name="m",engine="0"}'] == "1.5"
    assert s['old_seconds_count{model_name="m",engine="0"}'] == "3" and "# TYPE old_seconds histogram" in r.render()
    assert s['g{model_name="m",engine="0"}'] == "3" and s['info{a="x",b="y"}'] == "1"


def test_spec_decode_stats_count_accepted_drafts_per_position() -> None:
    stats = SpecDecodeStats().add(4, 2).add(3, 0).add(4, 4)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 11, 6)
    assert stats.accepted_per_pos == (2, 2, 1, 1)


def _vllm_metrics() -> ServerMetrics:
    return ServerMetrics(lambda: EngineStats(1, 2, 6, 8, prompt_tokens=7, generation_tokens=4), lambda: 0,
                         VllmInfo("m", 100, {"block_size": "16"}))


def test_vllm_request_intervals_and_counts() -> None:
    """vLLM's intervals: queue = scheduled - queued, prefill = first token - scheduled, decode =
    last - first token, inference = last token - scheduled; n and the longest choice once per request."""
    m = _vllm_metrics()
    v = m.vllm
    assert v is not None
    group = ChoiceGroup(2)
    for generated in (4, 6):
        out = StepOutput("r", [], "", True, "length", num_prompt_tokens=7, num_output_tokens=generated,
                         num_cached_tokens=3, queued_time=10.0, scheduled_time=10.5)
        v.finished(out, 9.0, 11.0, 13.0, 14.0, SamplingParams(max_tokens=None), group)
    assert (v.queue_time.sum, v.prefill_time.sum, v.decode_time.sum, v.inference_time.sum) == (1.0, 1.0, 4.0, 5.0)
    assert v.e2e.sum == 10.0 and v.prefill_kv_computed.sum == 8 and v.params_max_tokens.sum == 2 * 93
    assert (v.params_n.count, v.params_n.sum, v.max_num_generation_tokens.sum) == (1, 2, 6)
    assert v.request_success.value(("length",)) == 2 and v.request_tpot.sum == 2 / 3 + 2 / 5
    # Never reached the engine (refused, aborted before it was sent): not an engine request.
    v.finished(StepOutput("x", [], "", True, "abort"), 9.0, None, None, 9.5, SamplingParams(), None)
    assert v.request_success.value(("abort",)) == 0 and v.e2e.count == 2
    s = samples(m.render())
    assert s['vllm:kv_cache_usage_perc{model_name="m",engine="0"}'] == "0.25"
    assert s['vllm:prompt_tokens_total{model_name="m",engine="0"}'] == "7"
    assert s['vllm:request_success_total{model_name="m",engine="0",finished_reason="stop"}'] == "0"
    assert s['vllm:cache_config_info{block_size="16",engine="0"}'] == "1"
    assert "pdserve_prompt_tokens_total" in s and not any(k.startswith("vllm:spec_decode") for k in s)


def test_build_1_2_5_buckets() -> None:
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100] and build_1_2_5_buckets(1) == [1]
