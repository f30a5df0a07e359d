"""`vllm bench serve` flags accepted by `pdserve bench`: their mapping, their errors (naming the flag),
the result JSON fields they add, and one vLLM-style command line against the fake server."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import pytest

from pdserve.bench.client import Endpoint
from pdserve.bench.command import config_from_args, main
from pdserve.bench.report import ResultMeta, default_result_filename, format_summary, result_json, save_result
from pdserve.bench.runner import wait_ready
from pdserve.bench.vllm_args import check_result_args, result_path
from pdserve.bench.workload import BenchRequest, RampUp, WorkloadConfig, arrival_offsets, draw_adapters
from tests.unit.test_bench_client import FakeServer
from tests.unit.test_bench_command import _parse, _parser
from tests.unit.test_bench_report import _result


def test_aliases_and_request_options_map_to_config() -> None:
    args = _parse(
        "--backend", "vllm", "--random-input-len", "40", "--random-output-len", "7",
        "--random-range-ratio", '{"input": 0.25, "output": 0.5}', "--num-warmups", "3",
        "--metric-percentiles", "25,99", "--disable-tqdm", "--goodput", "ttft:500", "e2el:2000",
        "--temperature", "0.5", "--top-k", "4", "--extra-body", '{"top_k": 9, "x": [1]}', "--logprobs", "2",
        "--header", "a=1", "b = 2", "--served-model-name", "served", "--request-id-prefix", "p-",
        "--percentile-metrics", "ttft,client_queue_time", "--lora-modules", "l1", "l2",
        "--lora-assignment", "round-robin", "--insecure", "--ready-check-timeout-sec", "9",
        "--trust-remote-code", "--tokenizer-mode", "hf",
    )  # fmt: skip
    assert args.no_progress and args.warmup == 3
    cfg = config_from_args(args)
    w = cfg.workload
    assert (w.input_len, w.output_len, w.range_ratio, w.out_range_ratio) == (40, 7, 0.25, 0.5)
    assert cfg.endpoint_type == "completions" and cfg.backend == "vllm"
    assert cfg.percentiles == (25.0, 99.0) and cfg.percentile_metrics == ("ttft", "client_queue_time")
    assert [(s.name, s.threshold_ms) for s in cfg.slos] == [("ttft", 500.0), ("e2el", 2000.0)]
    assert cfg.extra_body == {"logprobs": 2, "temperature": 0.5, "top_k": 9, "x": [1]}  # --extra-body last
    assert cfg.headers == {"a": "1", "b": "2"} and cfg.served_model_name == "served"
    assert cfg.request_id_prefix == "p-" and cfg.insecure and cfg.ready_check_timeout_s == 9.0
    assert draw_adapters(w, 0, 3) == ["l1", "l2", "l1"]
    assert config_from_args(_parse("--output-len", "5", "--random-output-len", "7")).workload.output_len == 5
    assert config_from_args(_parse("--ignore-eos")).workload.is_random  # vLLM's random + --ignore-eos: accepted


def test_host_and_port() -> None:
    parse = lambda *a: config_from_args(_parser().parse_args(["bench", *a])).base_url  # noqa: E731
    assert parse() == "http://127.0.0.1:8000"
    assert parse("--host", "srv", "--port", "9") == "http://srv:9"
    assert parse("--host", "::1") == "http://[::1]:8000"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--backend", "openai-embeddings"], "--endpoint-type/--backend"),
        (["--profile"], "--profile"),
        (["--goodput", "itl_p99:50"], "--goodput"),
        (["--percentile-metrics", "ttft,latency"], "--percentile-metrics"),
        (["--random-range-ratio", '{"input": 0.1}'], "--range-ratio/--random-range-ratio"),
        (["--extra-body", "[1]"], "--extra-body"),
        (["--header", "nokey"], "--header"),
        (["--metadata", "=v"], "--metadata"),
        (["--ramp-up-strategy", "cubic"], "--ramp-up-strategy"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(*argv)
    assert info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--host", "h"], "--host"),  # _parse gives --base-url
        (["--slo", "ttft:1", "--goodput", "ttft:2"], "--goodput"),
        (["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1"], "--ramp-up-strategy"),
        (["--ramp-up-end-rps", "3"], "--ramp-up-end-rps"),
        (["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "4", "--ramp-up-end-rps", "2"],
         "--ramp-up-start-rps"),
        (["--ramp-up-strategy", "exponential", "--ramp-up-start-rps", "0", "--ramp-up-end-rps", "2"],
         "--ramp-up-start-rps"),
        (["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1", "--ramp-up-end-rps", "2",
          "--request-rate", "5"], "--request-rate"),
        (["--backend", "openai-chat", "--logprobs", "1"], "--logprobs"),
        (["--dataset-name", "custom", "--random-output-len", "3"], "--random-output-len"),
    ],
)  # fmt: skip
def test_cross_flag_errors(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(_parse(*argv))
    assert info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--result-dir", "d"], "--result-dir"),
        (["--result-filename", "g.json"], "--result-filename"),
        (["--save-detailed"], "--save-detailed"),
        (["--metadata", "a=b"], "--metadata"),
        (["--label", "x"], "--label"),
    ],
)
def test_result_flags_without_a_saved_result_warn(argv: list[str], flag: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(*argv)
    check_result_args(args)  # as vLLM: accepted, nothing saved
    assert capsys.readouterr().err == (f"pdserve bench: {flag} has no effect without --save-result or "
                                       "--append-result, as in vLLM\n")
    assert result_path(args, _result()) is None


def test_result_flags_with_a_saved_result(capsys: pytest.CaptureFixture[str]) -> None:
    check_result_args(_parse("--save-result", "--result-dir", "d", "--label", "x", "--save-detailed"))
    check_result_args(_parse("--append-result", "--result-filename", "g.json", "--metadata", "a=b"))
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as info:  # a real conflict: FILE names the file
        check_result_args(_parse("--save-result", "f.json", "--result-filename", "g.json"))
    assert info.value.code == 2 and "argument --result-filename:" in capsys.readouterr().err


def test_ramp_up_rates_and_arrivals() -> None:
    assert RampUp("linear", 1, 5).rates(5) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert RampUp("exponential", 1, 16).rates(5) == pytest.approx([1, 2, 4, 8, 16])
    offsets = arrival_offsets(4, math.inf, math.inf, ramp_up=RampUp("linear", 1, 4))
    assert offsets == pytest.approx([1.0, 1.5, 1.5 + 1 / 3, 1.5 + 1 / 3 + 0.25])  # gaps 1/rate, not rescaled
    assert arrival_offsets(3, 2.0) == arrival_offsets(3, 2.0, ramp_up=None)  # fixed rates unchanged
    with pytest.raises(ValueError):
        RampUp("linear", 0, 3)


def test_result_json_fields_of_vllm_flags(tmp_path: Path) -> None:
    base = _result()
    cfg = replace(base.config, backend="vllm", percentile_metrics=("ttft", "e2el_including_client_queue"),
                  ramp_up=RampUp("linear", 1, 4), max_concurrency=2)
    result = replace(base, config=cfg, rps_change_events=((1, "t0"), (2, "t1")))
    meta = ResultMeta(label="lbl", metadata=(("version", "0.3"), ("completed", "x")), detailed=True)
    data = result_json(result, meta)
    keys = list(data)
    assert keys.index("version") == keys.index("num_prompts") + 1 and data["completed"] == 3  # measured wins
    assert data["backend"] == "vllm" and data["label"] == "lbl" and len(data["generated_texts"]) == 4
    assert (data["ramp_up_strategy"], data["ramp_up_start_rps"], data["ramp_up_end_rps"]) == ("linear", 1, 4)
    assert data["rps_change_events"] == [{"rps": 1, "timestamp": "t0"}, {"rps": 2, "timestamp": "t1"}]
    assert "p99_ttft_ms" in data and "mean_e2el_including_client_queue_ms" in data
    assert "mean_itl_ms" not in data and "p99_tpot_ms" not in data and len(data["queue_times"]) == 4
    summary = format_summary(result)
    assert "Queue-inclusive End-to-end Latency" in summary and "Inter-token Latency" not in summary
    assert "generated_texts" not in result_json(base)
    assert default_result_filename(result) == "vllm-ramp-up-linear-1qps-4qps-concurrency2-m-20260101-000000.json"
    assert default_result_filename(base, "L") == "L-infqps-m-20260101-000000.json"
    path = tmp_path / "r.jsonl"
    save_result(base, path, append=True)
    save_result(base, path, append=True)
    assert [json.loads(line)["completed"] for line in path.read_text().splitlines()] == [3, 3]


def test_ready_check_gives_up() -> None:
    async def go() -> None:
        with FakeServer() as server:
            endpoint = Endpoint(url=server.base_url + "/v1/completions", model="http500")
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, endpoint, BenchRequest(0, (1, 2), 2), timeout_s=0.05, retry_s=0.01)

    with pytest.raises(RuntimeError, match="initial test run failed"):
        asyncio.run(go())


def test_vllm_command_line_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer() as server:
        url = urlparse(server.base_url)
        argv = [
            "bench", "--backend", "vllm", "--host", str(url.hostname), "--port", str(url.port),
            "--model", "org/Model", "--served-model-name", "ok", "--dataset-name", "random",
            "--random-input-len", "8", "--random-output-len", "3", "--num-prompts", "4", "--ignore-eos",
            "--ramp-up-strategy", "exponential", "--ramp-up-start-rps", "200", "--ramp-up-end-rps", "400",
            "--goodput", "ttft:10000", "tpot:10000", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "90,99", "--temperature", "0.3", "--extra-body", '{"seed": 1}',
            "--header", "x-team=a", "--request-id-prefix", "run1-", "--ready-check-timeout-sec", "5",
            "--save-result", "--result-dir", str(tmp_path), "--metadata", "tp=1", "--disable-tqdm",
        ]  # fmt: skip
        assert main(argv) == 0
    body = server.payloads[-1]
    assert body["model"] == "ok" and body["temperature"] == 0.3 and body["seed"] == 1
    ids = [{k.lower(): v for k, v in h.items()}.get("x-request-id") for h in server.headers]
    assert ids[0] is None and sorted(ids[1:]) == ["run1-0", "run1-1", "run1-2", "run1-3"]  # ready check: no id
    assert all(h.get("x-team") == "a" for h in server.headers)
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("vllm-ramp-up-exponential-200qps-400qps-Model-")
    data = json.loads(path.read_text())
    assert data["model_id"] == "org/Model" and data["tp"] == "1" and data["backend"] == "vllm"
    assert data["request_goodput"] > 0 and "p90_itl_ms" in data and data["rps_change_events"][0]["rps"] == 200
    assert f"Result saved to {path}" in capsys.readouterr().out


def test_workload_output_range_ratio() -> None:
    w = WorkloadConfig(num_prompts=1, range_ratio=0.5, output_range_ratio=0.0)
    assert w.out_range_ratio == 0.0 and WorkloadConfig(range_ratio=0.5).out_range_ratio == 0.5
    with pytest.raises(ValueError):
        WorkloadConfig(output_range_ratio=1.0)
