"""`pdserve sweep` logic on synthetic results: rates, SLO sets, the summary table, JSON, figures."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.bench.client import RequestRecord
from pdserve.bench.metrics import compute_metrics
from pdserve.bench.runner import BenchConfig, BenchResult
from pdserve.bench.sweep import (
    RatePoint,
    Series,
    SweepConfig,
    default_slo_sets,
    parse_named_url,
    parse_rates,
    parse_slo_set,
    pick_headline_rate,
    run_sweep,
)
from pdserve.bench.sweep_command import add_parser, config_from_sweep_args, load_results, rerender, write_outputs
from pdserve.bench.sweep_report import (
    _record,
    attainment_curve,
    markdown_summary,
    series_from_json,
    summarize,
    sweep_json,
)
from pdserve.bench.workload import WorkloadConfig

# --- rates, SLO sets, names -------------------------------------------------------------------


def test_rate_range_is_inclusive_and_exact() -> None:
    rates = parse_rates("0.5:10:0.5")
    assert len(rates) == 20 and rates[0] == 0.5 and rates[-1] == 10.0 and 2.5 in rates
    assert parse_rates("0.1:0.3:0.1") == (0.1, 0.2, 0.3)  # no float drift dropping the stop
    assert parse_rates("1:2.2:0.5") == (1.0, 1.5, 2.0)  # stop off the grid: not included


def test_rate_list_is_sorted_and_deduplicated() -> None:
    assert parse_rates("4, 1,2,2") == (1.0, 2.0, 4.0)
    assert parse_rates("3") == (3.0,)


@pytest.mark.parametrize("bad", ["", "0", "-1,2", "a,b", "3:1:1", "1:2:0", "1:2", "inf", "nan"])
def test_bad_rates_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="rates"):
        parse_rates(bad)


def test_default_slo_sets() -> None:
    sets = {s.name: s.spec() for s in default_slo_sets(1000, 50)}
    assert sets == {
        "both": "ttft:1000,itl_p99:50",
        "both-tpot": "ttft:1000,tpot:50",
        "ttft": "ttft:1000",
        "itl_p99": "itl_p99:50",
        "tpot": "tpot:50",
    }
    assert default_slo_sets(2000, 80)[0].describe() == "TTFT <= 2000 ms and ITL p99 <= 80 ms"


def test_custom_slo_set() -> None:
    s = parse_slo_set("strict = ttft:500, itl_max:30")
    assert s.name == "strict" and s.spec() == "ttft:500,itl_max:30"
    for bad in ("strict", "=ttft:1", "x=", "x=ttft:1,ttft:2", "x=bogus:1"):
        with pytest.raises(ValueError):
            parse_slo_set(bad)


def test_named_url() -> None:
    assert parse_named_url("vllm=http://127.0.0.1:8000") == ("vllm", "http://127.0.0.1:8000")
    for bad in ("http://x:1", "vllm=", "vllm=localhost:8000"):
        with pytest.raises(ValueError):
            parse_named_url(bad)


def test_headline_rate_snaps_to_a_swept_rate() -> None:
    rates = parse_rates("0.5:10:0.5")
    assert pick_headline_rate(rates, None) == 8.0  # 0.8 x the highest, like the article's 8 of 10
    assert pick_headline_rate(rates, 3.0) == 3.0
    assert pick_headline_rate((1.0, 2.0, 4.0), 3.0) == 4.0  # a tie goes to the higher rate


# --- synthetic results ------------------------------------------------------------------------

GAP = 0.02  # 20 ms decode gaps


def record(i: int, ttft: float = 0.2, spikes: int = 0, tokens: int = 101, success: bool = True) -> RequestRecord:
    """A request with `tokens` chunks: TTFT `ttft`, 20 ms gaps, the first `spikes` gaps 200 ms."""
    times, t = [], 10.0 * i + ttft
    for k in range(tokens):
        times.append(t)
        t += 0.2 if k < spikes else GAP
    return RequestRecord(index=i, prompt_len=112, expected_output_len=tokens, scheduled_time=10.0 * i,
                         send_time=10.0 * i, end_time=times[-1], chunk_times=tuple(times) if success else (),
                         output_tokens=tokens if success else 0, success=success,
                         error="" if success else "HTTP 500")


def point(rate: float, good: int, itl_bad: int = 0, ttft_bad: int = 0, failed: int = 0) -> RatePoint:
    recs = ([record(i) for i in range(good)] + [record(i, spikes=3) for i in range(itl_bad)]
            + [record(i, ttft=1.5) for i in range(ttft_bad)] + [record(i, success=False) for i in range(failed)])
    return RatePoint(rate, tuple(recs), duration_s=10 / rate)


def cfg(tmp: Path | str = "unused", rates: tuple[float, ...] = (1.0, 2.0, 4.0), **kw: object) -> SweepConfig:
    bench = BenchConfig(base_url="", workload=WorkloadConfig(num_prompts=10, input_len=112, output_len=101))
    return SweepConfig(model="dummy:x", bench=bench, rates=rates, topologies=("standard:2", "disagg-write"),
                       headline_rate=2.0, out_dir=str(tmp), **kw)  # type: ignore[arg-type]


SERIES = (
    Series("standard:2", "topology", "http://a", (point(1, 10), point(2, 3, itl_bad=7), point(4, 1, itl_bad=9))),
    Series("disagg-write", "topology", "http://b",
           (point(1, 10), point(2, 8, ttft_bad=2), point(4, 4, ttft_bad=5, failed=1))),
)


def test_attainment_curve_and_goodput() -> None:
    s2, dw = summarize(cfg(), SERIES)
    assert [p.attainment for p in s2.curve("both")] == [1.0, 0.3, 0.1]
    assert [p.attainment for p in s2.curve("ttft")] == [1.0, 1.0, 1.0]
    assert [p.attainment for p in dw.curve("itl_p99")] == [1.0, 1.0, 0.9]  # the failed one misses too
    assert s2.goodput_of("both").rate == pytest.approx(1 + 0.1 / 0.7)  # 1.0 -> 0.3 crosses 0.9
    assert dw.goodput_of("both").rate == pytest.approx(1 + 0.1 / 0.2)
    assert s2.goodput_of("ttft").lower_bound
    assert attainment_curve((), ()) == ()


def test_headline_cells() -> None:
    s2, dw = summarize(cfg(), SERIES)
    assert (s2.headline.good, s2.headline.total, s2.headline.failure.label) == (3, 10, "ITL p99 > 50 ms")
    assert dw.headline.failure.label == "TTFT > 1000 ms" and dw.headline.failure.count == 2
    assert s2.headline.request_goodput == pytest.approx(3 / 5)
    assert s2.headline.p99_itl_ms > 50 and dw.headline.p99_itl_ms == pytest.approx(20, abs=1)
    assert dict(dw.headline.per_set_good) == {"both": 8, "both-tpot": 8, "ttft": 8, "itl_p99": 10, "tpot": 10}


def test_markdown_table_shaped_like_the_article() -> None:
    md = markdown_summary(cfg(), summarize(cfg(), SERIES))
    assert "| Metric | standard:2 | disagg-write |" in md
    assert "| Requests meeting both SLOs at 2 req/s | 3/10 | 8/10 |" in md
    assert "| Primary failure mode | ITL p99 > 50 ms (7 of 7 bad) | TTFT > 1000 ms (2 of 2 bad) |" in md
    assert "| Relative goodput (good req/s at 2 req/s vs standard:2) | 1x | 2.7x |" in md
    assert "| Relative DistServe goodput (vs standard:2) | 1x | 1.3x |" in md
    assert "| 4 | 10% | 40% |" in md  # attainment per rate
    assert "| both | ttft:1000,itl_p99:50 | 1.14 | 1.50 |" in md
    assert "prefix cache" not in md  # no cached prompt tokens: no row


def test_prefix_cache_share_row_survives_the_json() -> None:
    """A prefix workload: the share of prompt tokens the server found cached (from usage) gets a row,
    also when the report is re-rendered from results.json."""
    cached = tuple(replace(r, cached_tokens=96) for r in point(2, 10).records)
    series = (SERIES[0], Series("disagg-write", "topology", "http://b", (RatePoint(2.0, cached, 5.0),)))
    md = markdown_summary(cfg(), summarize(cfg(), series))
    assert "| Prompt tokens from the prefix cache at 2 req/s | 0% | 86% |" in md
    row = {"index": 0, "start_time": 1.0, "ttft": 0.1, "itl": [0.02], "prompt_len": 112, "output_tokens": 2,
           "success": True, "cached_tokens": 96}
    assert _record(row, 2).cached_tokens == 96  # what --from-results rebuilds
    assert _record({k: v for k, v in row.items() if k != "cached_tokens"}, 2).cached_tokens == 0  # older files


def test_missing_baseline_and_missing_rate_are_na() -> None:
    only = (SERIES[1], Series("standard:1", "topology", "", (), "topology standard:1 not ready"))
    md = markdown_summary(cfg(), summarize(cfg(), only))
    assert "n/a" in md and "- standard:1: topology standard:1 not ready" in md
    zero = (Series("standard:2", "topology", "", (point(2, 0, itl_bad=10),)), SERIES[1])
    assert "n/a (baseline 0)" in markdown_summary(cfg(), summarize(cfg(), zero))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="headline SLO set"):
        cfg(headline_set="nope")
    with pytest.raises(ValueError, match="distinct"):
        cfg(external=(("standard:2", "http://x:1"),))


def test_outputs_json_and_figures(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    _, paths = write_outputs(c, SERIES)
    names = {p.name for p in paths}
    assert {"results.json", "summary.md", "fig3_per_request.png", "fig4_attainment.png"} <= names
    assert "fig4_attainment_ttft.png" in names
    assert all(p.stat().st_size > 0 for p in paths)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [s["name"] for s in data["series"]] == ["standard:2", "disagg-write"]
    assert data["series"][0]["attainment"]["both"] == [[1.0, 1.0], [2.0, 0.3], [4.0, 0.1]]
    assert data["series"][1]["headline"]["primary_failure_mode"]["label"] == "TTFT > 1000 ms"
    json.dumps(sweep_json(c, SERIES, summarize(c, SERIES)), allow_nan=False)


def test_unreachable_external_endpoint_is_recorded_not_raised() -> None:
    c = SweepConfig(model="m", bench=BenchConfig(base_url="", workload=WorkloadConfig(num_prompts=2)),
                    rates=(1.0,), topologies=(), external=(("peer", "http://127.0.0.1:9"),), warmup=0)
    (series,) = run_sweep(c, log=lambda _msg: None)
    assert series.name == "peer" and series.points == () and "rate 1" in (series.error or "")


def test_rates_log_p99_whatever_percentiles_were_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--percentiles 50,90` leaves 99 out of the metrics; the sweep's own p99 log line must not need it."""
    import pdserve.bench.sweep as sweep

    async def fake_benchmark(bench: BenchConfig, probe: object = None) -> BenchResult:
        recs = tuple(record(i) for i in range(3))
        return BenchResult(bench, "m", "d", 0.0, 10.0, recs, compute_metrics(recs, 10.0, (), bench.percentiles))

    monkeypatch.setattr(sweep, "run_benchmark", fake_benchmark)
    monkeypatch.setattr(sweep, "cpu_busy", lambda *_a: None)
    c = cfg(rates=(1.0,))
    c = replace(c, bench=replace(c.bench, percentiles=(50.0, 90.0)))
    lines: list[str] = []
    points, error = sweep.run_rates(c, "s", "http://x", lines.append)
    assert error is None and len(points) == 1
    assert "p99 TTFT 200 ms, p99 ITL 20 ms" in lines[0]
    assert points[0].result is not None and points[0].result.metrics.ttft.percentiles_ms[-1][0] == 90.0  # the user's


# --- the command line -------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["sweep", *argv])


def test_command_line_to_config() -> None:
    c = config_from_sweep_args(parse("dummy:m", "--topologies", "standard:2, disagg-read", "--rates", "1:3:1",
                                     "--input-len", "64", "--base-url", "vllm=http://h:1", "--slo-set", "x=ttft:5",
                                     "--itl-slo", "40", "--engine-args", "--num-kv-blocks 64", "--out", "o"))
    assert c.topologies == ("standard:2", "disagg-read") and c.rates == (1.0, 2.0, 3.0)
    assert c.external == (("vllm", "http://h:1"),) and c.bench.workload.input_len == 64
    assert [s.name for s in c.slo_sets][-1] == "x" and c.headline.spec() == "ttft:1000,itl_p99:40"
    assert c.engine_args == ("--num-kv-blocks", "64") and c.out_dir == "o" and c.warmup == 4


def test_bench_flags_a_sweep_sets_itself_are_refused() -> None:
    with pytest.raises(ValueError, match="--rates"):
        config_from_sweep_args(parse("m", "--request-rate", "3"))
    with pytest.raises(SystemExit):
        parse("m", "--rates", "0")


def test_machine_busy_reading() -> None:
    from pdserve.bench.sweep import cpu_busy, wait_quiet

    busy = cpu_busy(0.2)
    assert busy is None or 0.0 <= busy <= 1.0
    waited = []
    assert wait_quiet(1.0, 0.0, waited.append) == pytest.approx(busy, abs=1.0) and not waited  # 100%: no wait


def with_results(series: Series, c: SweepConfig) -> Series:
    """`series` with a BenchResult on every point (what a real sweep records)."""
    points = []
    for p in series.points:
        bench = BenchConfig(base_url=series.base_url, workload=c.bench.workload, request_rate=p.rate,
                            slos=c.headline.slos)
        result = BenchResult(bench, "m", "20250101-000000", 0.0, p.duration_s, p.records,
                             compute_metrics(p.records, p.duration_s, bench.slos))
        points.append(RatePoint.of(result, 0.1))
    return Series(series.name, series.kind, series.base_url, tuple(points), series.error)


def test_results_json_round_trips_for_rerendering(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    full = tuple(with_results(s, c) for s in SERIES)
    write_outputs(c, full)
    data = load_results(str(tmp_path / "results.json"))
    assert data["series"][0]["runs"][0]["cpu_busy_before"] == 0.1
    again = series_from_json(data)
    assert markdown_summary(c, summarize(c, again)) == markdown_summary(c, summarize(c, full))
    other = tmp_path / "other"
    write_outputs(replace(c, topologies=("standard:1",), out_dir=str(other)),
                  (replace(with_results(SERIES[0], c), name="standard:1"),))
    args = parse("--from-results", str(tmp_path / "results.json"), str(other / "results.json"), "--itl-slo", "300",
                 "--headline-rate", "4", "--out", str(tmp_path / "loose"))
    assert rerender(args) == 0
    md = (tmp_path / "loose" / "summary.md").read_text()
    assert "| Metric | standard:2 | disagg-write | standard:1 |" in md  # merged
    assert "| Requests meeting both SLOs at 4 req/s | 10/10 | 4/10 | 10/10 |" in md  # 200 ms spikes now pass
    assert not (tmp_path / "loose" / "results.json").exists()


def test_a_dataset_sweep_names_its_file_and_endpoint_and_rerenders(tmp_path: Path) -> None:
    w = WorkloadConfig(num_prompts=10, dataset_name="sharegpt", dataset_path="/data/sg.json")
    c = replace(cfg(tmp_path), bench=BenchConfig(base_url="", endpoint_type="chat", workload=w))
    full = tuple(with_results(s, c) for s in SERIES)
    md = markdown_summary(c, summarize(c, full))
    assert "10 requests per rate, ShareGPT file /data/sg.json, the replies' output lengths, chat endpoint;" in md
    data = sweep_json(c, full, summarize(c, full))
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert {k: data["workload"][k] for k in ("dataset_name", "dataset_path", "endpoint_type")} == {
        "dataset_name": "sharegpt", "dataset_path": "/data/sg.json", "endpoint_type": "chat"}
    assert data["series"][0]["runs"][0]["dataset_name"] == "sharegpt"  # type: ignore[index]
    assert rerender(parse("--from-results", str(tmp_path / "results.json"), "--out", str(tmp_path / "again"))) == 0
    assert (tmp_path / "again" / "summary.md").read_text() == md


def test_distserve_ratio_keeps_the_bounds() -> None:
    from pdserve.bench.goodput import DistServeGoodput
    from pdserve.bench.sweep_report import _goodput_ratio

    def g(rate: float, lower: bool = False, below: bool = False) -> DistServeGoodput:
        return DistServeGoodput(rate, 0.9, lower, below)

    base = g(0.5)
    assert _goodput_ratio(g(2.0), base, 0.5) == "4x"
    assert _goodput_ratio(g(0.0, below=True), base, 0.25) == "< 0.5x"  # below the lowest rate tested
    assert _goodput_ratio(g(8.0, lower=True), base, 0.5) == ">= 16x"  # never fell below the target
    assert _goodput_ratio(g(4.0), g(0.0, below=True), 0.5) == "> 8x"
    assert _goodput_ratio(g(1.0), g(8.0, lower=True), 0.5) == "<= 0.12x"
    assert _goodput_ratio(base, base, 0.5) == "1x" and _goodput_ratio(None, base, 0.5) == "n/a"
