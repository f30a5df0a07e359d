"""Result JSON (vLLM field names), the summary table and the PNG plots, from synthetic records."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from pdserve.bench.goodput import AttainmentPoint
from pdserve.bench.metrics import compute_metrics, parse_slos
from pdserve.bench.plots import plot_attainment_vs_rate, plot_per_request
from pdserve.bench.report import format_summary, result_json, save_result
from pdserve.bench.runner import BenchConfig, BenchResult
from pdserve.bench.workload import WorkloadConfig
from tests.unit.test_bench_metrics import failed, rec

VLLM_FIELDS = {
    "date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput", "input_lens",
    "output_lens", "ttfts", "itls", "latencies", "start_times", "errors", "max_output_tokens_per_s",
    "max_concurrent_requests",
    *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
      for s in ("mean", "median", "std", "p99", "p50")),
}  # fmt: skip


def _result(slos: str = "ttft:1000,itl_p99:50", rate: float = math.inf) -> BenchResult:
    records = (
        rec([10.1, 10.12, 10.14], send=10.0, index=0),  # good
        rec([10.6, 10.8, 11.0], send=10.5, index=1),  # ITL 200 ms
        rec([12.5, 12.52], send=11.0, index=2),  # TTFT 1.5 s
        failed(index=3, send=11.5),
    )
    cfg = BenchConfig(
        base_url="http://x:1",
        workload=WorkloadConfig(num_prompts=4, input_len=8, output_len=3),
        request_rate=rate,
        slos=parse_slos([s for s in slos.split(",") if s]),
        percentiles=(50.0, 99.0, 99.9),
    )
    m = compute_metrics(records, 3.0, cfg.slos, cfg.percentiles)
    return BenchResult(cfg, "m", "20260101-000000", 10.0, 3.0, records, m)


def test_result_json_has_vllm_fields_and_detail(tmp_path: Path) -> None:
    path = save_result(_result(), tmp_path / "sub" / "r.json")
    data = json.loads(path.read_text())
    assert VLLM_FIELDS <= data.keys()
    assert data["request_rate"] == "inf" and data["backend"] == "openai" and data["model_id"] == "m"
    assert data["p99.9_ttft_ms"] >= data["p99_ttft_ms"]
    assert (data["completed"], data["failed"]) == (3, 1)
    assert data["output_lens"] == [3, 3, 2, 0]
    assert data["ttfts"][0] == pytest.approx(0.1) and data["ttfts"][3] == 0.0
    assert data["itls"][1] == pytest.approx([0.2, 0.2])
    assert data["start_times"] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert data["errors"][3].startswith("HTTP 500")
    assert data["request_goodput"] == pytest.approx(1 / 3)
    assert data["slo_attainment"] == pytest.approx(0.25) and data["good_requests"] == 1
    assert data["slos"] == [
        {"name": "ttft", "threshold_ms": 1000.0, "label": "TTFT"},
        {"name": "itl_p99", "threshold_ms": 50.0, "label": "ITL p99"},
    ]
    assert data["primary_failure_mode"]["bad"] == 3
    detail = data["requests"]
    assert [d["good"] for d in detail] == [True, False, False, False]
    assert detail[1]["missed_slos"] == ["itl_p99"] and detail[2]["missed_slos"] == ["ttft"]
    assert detail[3]["ttft"] is None and detail[3]["success"] is False
    assert detail[0]["itl"] == pytest.approx([0.02, 0.02]) and detail[0]["start_time"] == 0.0


def test_result_records_dataset_and_endpoint_type() -> None:
    data = result_json(_result())
    assert (data["endpoint_type"], data["endpoint"], data["dataset_name"], data["dataset_path"]) == (
        "openai", "/v1/completions", "random", None)
    assert (data["input_len"], data["output_len"], data["ignore_eos"], data["tokenizer_id"]) == (8, 3, True, None)
    res = _result()
    w = WorkloadConfig(num_prompts=4, dataset_name="sharegpt", dataset_path="/d/sg.json")
    chat = replace(res, config=replace(res.config, endpoint_type="chat", workload=w), tokenizer_id="http://x:1/tokenize")
    data = result_json(chat)
    assert (data["endpoint_type"], data["backend"], data["endpoint"]) == ("openai-chat", "openai-chat",
                                                                         "/v1/chat/completions")
    assert (data["dataset_name"], data["dataset_path"], data["input_len"], data["output_len"]) == (
        "sharegpt", "/d/sg.json", None, None)  # output lengths from the replies
    assert data["ignore_eos"] is False and data["tokenizer_id"] == "http://x:1/tokenize"
    assert [d["expected_output_len"] for d in data["requests"]] == [3, 3, 2, 0]
    text = format_summary(chat)
    assert "Endpoint type:                           chat (/v1/chat/completions)" in text
    assert "Dataset:                                 sharegpt (/d/sg.json)" in text


def test_no_slo_means_null_goodput() -> None:
    data = result_json(_result(slos=""))
    assert data["request_goodput"] is None and data["primary_failure_mode"] is None
    assert data["slo_attainment"] == pytest.approx(0.75)  # good == succeeded when no SLO


def test_summary_table() -> None:
    text = format_summary(_result(rate=8.0))
    assert text.splitlines()[0] == "{:=^50}".format(" Serving Benchmark Result ")
    for needle in (
        "Successful requests:                     3",
        "Request rate configured (RPS):           8.00",
        "Request goodput (req/s):                 0.33",
        "P99.9 TTFT (ms):",
        "Mean ITL (ms):",
        "Requests meeting all SLOs:               1/4 (25.0%)",
        "Primary failure mode:",
    ):
        assert needle in text, needle
    assert "Request rate configured" not in format_summary(_result())


def test_per_request_plots(tmp_path: Path) -> None:
    res = _result()
    paths = plot_per_request(res.records, res.config.slos, tmp_path / "plots")
    assert [p.name for p in paths] == ["ttft_per_request.png", "itl_per_request.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plot_per_request([], [], tmp_path / "empty"))


def test_attainment_plot_several_series(tmp_path: Path) -> None:
    series = {
        "standard x1": [AttainmentPoint(r, a) for r, a in ((0.5, 0.6), (1, 0.4), (2, 0.26))],
        "disagg read": [AttainmentPoint(r, a) for r, a in ((0.5, 1.0), (1, 1.0), (2, 0.8))],
        "disagg write": [AttainmentPoint(r, a) for r, a in ((0.5, 1.0), (1, 1.0), (2, 1.0))],
        "empty": [],
    }
    path = plot_attainment_vs_rate(series, tmp_path / "attainment.png", title="test")
    assert path.read_bytes().startswith(b"\x89PNG")
