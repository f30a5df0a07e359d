"""`pdserve bench` flags, errors naming the flag, and a full run against the fake server."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from pdserve.bench.command import add_parser, config_from_args
from tests.unit.test_bench_client import FakeServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["bench", "--base-url", "http://h:1", *argv])


def test_defaults() -> None:
    args = _parse()
    cfg = config_from_args(args)
    assert args.func.__name__ == "run"
    assert cfg.endpoint is None and cfg.path == "/v1/completions" and cfg.url == "http://h:1/v1/completions"
    assert cfg.endpoint_type == "completions" and cfg.tokenizer is None
    w = cfg.workload
    assert (w.dataset_name, w.dataset_path, w.input_len, w.output_len) == ("random", None, 1024, 128)
    assert cfg.request_rate == math.inf and cfg.burstiness == 1.0 and cfg.max_concurrency is None
    assert cfg.percentiles == (50.0, 90.0, 99.0) and cfg.slos == () and cfg.warmup == 0
    assert cfg.workload.vocab_range == (0, 256) and cfg.timeout_s is None


def test_flags_map_to_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    args = _parse(
        "--model", "m", "--num-prompts", "7", "--input-len", "33", "--output-len", "9",
        "--range-ratio", "0.2",
        "--request-rate", "2.5", "--burstiness", "0.5", "--max-concurrency", "4", "--seed", "3",
        "--warmup", "2", "--slo", "ttft:1000", "--slo", "itl_p99:50", "--percentiles", "50,99.9",
        "--timeout", "30", "--vocab-range", "3:100", "--exclude-token-ids", "5,6", "--no-progress",
    )  # fmt: skip
    cfg = config_from_args(args)
    w = cfg.workload
    assert (w.num_prompts, w.input_len, w.output_len, w.range_ratio, w.seed) == (7, 33, 9, 0.2, 3)
    assert w.vocab_range == (3, 100) and w.exclude_token_ids == {5, 6}
    assert (cfg.request_rate, cfg.burstiness, cfg.max_concurrency, cfg.warmup) == (2.5, 0.5, 4, 2)
    assert [s.name for s in cfg.slos] == ["ttft", "itl_p99"] and cfg.percentiles == (50.0, 99.9)
    assert cfg.timeout_s == 30.0 and cfg.model == "m" and cfg.api_key == "from-env"
    assert config_from_args(_parse("--api-key", "flag")).api_key == "flag"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--slo", "itl:50"], "--slo"),
        (["--slo", "ttft:abc"], "--slo"),
        (["--request-rate", "0"], "--request-rate"),
        (["--request-rate", "fast"], "--request-rate"),
        (["--burstiness", "-1"], "--burstiness"),
        (["--range-ratio", "1"], "--range-ratio"),
        (["--num-prompts", "0"], "--num-prompts"),
        (["--input-len", "1.5"], "--input-len"),
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--warmup", "-2"], "--warmup"),
        (["--percentiles", "50,101"], "--percentiles"),
        (["--percentiles", "p99"], "--percentiles"),
        (["--timeout", "0"], "--timeout"),
        (["--vocab-range", "9:3"], "--vocab-range"),
        (["--exclude-token-ids", "a,b"], "--exclude-token-ids"),
    ],
)
def test_bad_values_are_argparse_errors_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(*argv)
    assert info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--slo", "ttft:1", "--slo", "ttft:2"], "--slo"),
        (["--vocab-range", "0:2", "--exclude-token-ids", "0,1"], "--exclude-token-ids"),
    ],
)
def test_cross_flag_errors(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(_parse(*argv))
    assert info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_bad_slo_message_names_the_criterion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--slo", "ttft:1000", "--slo", "latency:5")
    assert "'latency:5'" in capsys.readouterr().err


def test_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer() as server:
        args = _parser().parse_args(
            ["bench", "--base-url", server.base_url, "--num-prompts", "5", "--input-len", "16",
             "--output-len", "4", "--request-rate", "100", "--warmup", "1", "--slo", "ttft:10000",
             "--slo", "itl_p99:10000", "--save-result", str(tmp_path / "r.json"),
             "--plot-dir", str(tmp_path / "plots"), "--no-progress"]
        )  # fmt: skip
        assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Requests meeting all SLOs:               5/5" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["completed"] == 5 and data["num_prompts"] == 5 and data["request_rate"] == 100.0
    assert data["total_input_tokens"] == 80 and data["total_output_tokens"] == 20
    assert len(server.payloads) == 6  # 1 warm-up + 5
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "itl_per_request.png",
        "ttft_per_request.png",
    ]


def test_run_unreachable_server_returns_1(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("--no-progress")  # no --model: GET /v1/models fails
    args.base_url = "http://127.0.0.1:9"
    assert args.func(args) == 1
    assert "pdserve bench: GET http://127.0.0.1:9/v1/models failed" in capsys.readouterr().err


def test_run_all_failed_returns_1(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer() as server:
        args = _parse("--model", "http500", "--num-prompts", "3", "--input-len", "4", "--no-progress")
        args.base_url = server.base_url
        assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "3 requests failed" in err and "3 x HTTP 500" in err
