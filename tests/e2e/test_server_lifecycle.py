"""Client disconnects abort their requests (blocks come back); SIGTERM drains, then exits 0."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e import prom_text
from tests.e2e.conftest import TINY_MODEL, ServerProcess, pdserve_server

LONG = {"prompt": "tell me everything", "max_tokens": 3000, "ignore_eos": True}
ABORTS = 'pdserve_requests_total{finish_reason="abort"}'


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(module_tmp, "--num-kv-blocks", "400") as s:
        yield s


def _idle(server: ServerProcess, total: float) -> dict[str, float]:
    return server.wait_metrics(
        {
            "pdserve_num_requests_running": 0,
            "pdserve_num_requests_waiting": 0,
            "pdserve_num_requests_in_flight": 0,
            "pdserve_kv_blocks_free": total,
        }
    )


def test_disconnect_mid_stream_frees_blocks(server: ServerProcess) -> None:
    before = server.metrics()
    total = before["pdserve_kv_blocks_total"]
    assert before["pdserve_kv_blocks_free"] == total
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", f"{server.v1_url}/completions", json={**LONG, "stream": True}) as r,
    ):
        lines = r.iter_lines()
        got = [line for _, line in zip(range(20), lines, strict=False) if line.startswith("data:")]
        assert len(got) >= 5
        during = server.metrics()
        assert during["pdserve_num_requests_running"] == 1
        assert during["pdserve_kv_blocks_free"] < total
    after = _idle(server, total)  # the client closed the connection: the request was aborted
    assert after[ABORTS] == before.get(ABORTS, 0) + 1


def test_disconnect_non_streaming_frees_blocks(server: ServerProcess) -> None:
    before = server.metrics()
    total = before["pdserve_kv_blocks_total"]
    body = json.dumps(LONG).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        server.wait_metrics({"pdserve_num_requests_running": 1})
    after = _idle(server, total)
    assert after[ABORTS] == before.get(ABORTS, 0) + 1


def test_sigterm_drains_in_flight_stream(module_tmp: Path) -> None:
    with pdserve_server(module_tmp, "--drain-timeout", "30") as s:
        body = {"prompt": "drain me", "max_tokens": 800, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{s.v1_url}/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["choices"][0]["finish_reason"] is None
            s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while httpx.get(f"{s.base_url}/health").status_code != 503:  # drain visible to balancers
                assert time.monotonic() < deadline
                time.sleep(0.05)
            late = httpx.post(f"{s.v1_url}/completions", json={"prompt": "late", "max_tokens": 1})
            assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        finals = [json.loads(x[5:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finals[-1] == "length"  # the in-flight request ran to its end
        assert s.proc.wait(30) == 0, s.log()
        assert "drained" in s.log()


def test_sigterm_drain_timeout_aborts_stragglers(module_tmp: Path) -> None:
    with pdserve_server(module_tmp, "--drain-timeout", "0.3") as s:
        body = {**LONG, "stream": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{s.v1_url}/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data:"))
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "abort"
        assert s.proc.wait(30) == 0, s.log()


def test_vllm_metrics_count_what_was_served(server: ServerProcess) -> None:
    """vLLM's `vllm:*` metrics (so its Grafana dashboard works) count the requests served: streamed,
    not, n = 2, one stopped by a stop token, one aborted by its client; the text parses strictly."""
    model = {"model_name": TINY_MODEL, "engine": "0"}

    def scrape() -> dict[str, prom_text.Family]:
        r = httpx.get(f"{server.base_url}/metrics", timeout=10)
        r.raise_for_status()
        return prom_text.parse(r.text)

    def v(fams: dict[str, prom_text.Family], name: str, **labels: str) -> float:
        return prom_text.value(fams, name, **model, **labels)

    total = server.metrics()["pdserve_kv_blocks_total"]
    _idle(server, total)
    before = scrape()
    prompt = "count the vllm metrics"
    served: list[tuple[int, int, str]] = []  # per engine request: prompt tokens, generated tokens, finish reason
    with httpx.Client(base_url=server.v1_url, timeout=60) as c:
        body = {"prompt": prompt, "max_tokens": 5, "ignore_eos": True, "temperature": 0, "return_token_ids": True}
        r = c.post("/completions", json=body).json()
        served.append((r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]))
        stop_at = r["choices"][0]["token_ids"][1]
        r = c.post("/completions", json={**body, "stop_token_ids": [stop_at], "ignore_eos": False}).json()
        served.append((r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]))
        assert served[-1][2] == "stop"
        r = c.post("/completions", json={**body, "n": 2, "max_tokens": 3}).json()
        served += [(r["usage"]["prompt_tokens"], 3, ch["finish_reason"]) for ch in r["choices"]]
        with c.stream("POST", "/completions", json={**body, "max_tokens": 4, "stream": True,
                                                     "stream_options": {"include_usage": True}}) as s:
            chunks = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data: {")]
        usage = chunks[-1]["usage"]
        served.append((usage["prompt_tokens"], usage["completion_tokens"], "length"))
        long_prompt = len(httpx.post(f"{server.base_url}/tokenize", json={"prompt": LONG["prompt"]}).json()["tokens"])
        with c.stream("POST", "/completions", json={**LONG, "stream": True}) as s:
            lines = s.iter_lines()  # kept: dropping the iterator would close the stream
            got = [line for _, line in zip(range(8), lines, strict=False) if line.startswith("data:")]
            during = scrape()
            assert 0 < v(during, "vllm:kv_cache_usage_perc") <= 1
            assert v(during, "vllm:num_requests_running") == 1
    _idle(server, total)
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return v(after, name, **labels) - v(before, name, **labels)

    requests = len(served) + 1  # engine requests, the aborted one too
    aborted_tokens = delta("vllm:generation_tokens_total") - sum(g for _, g, _ in served)
    assert aborted_tokens >= len(got) - 1 > 0  # streamed to the client before it went away
    assert delta("vllm:prompt_tokens_total") == sum(p for p, _, _ in served) + long_prompt
    assert delta("vllm:generation_tokens_total") == delta("vllm:request_generation_tokens_sum")
    pd = "pdserve_generation_tokens_total"  # pdserve's own count agrees
    assert delta("vllm:generation_tokens_total") == prom_text.value(after, pd) - prom_text.value(before, pd)
    for reason in ("stop", "length", "abort", "error"):
        expected = sum(r == reason for _, _, r in served) + (reason == "abort")
        assert delta("vllm:request_success_total", finished_reason=reason) == expected, reason
    for hist in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds", "time_to_first_token_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "request_params_max_tokens",
                 "request_time_per_output_token_seconds", "request_prefill_kv_computed_tokens"):
        assert delta(f"vllm:{hist}_count") == requests, hist
    assert delta("vllm:request_prompt_tokens_sum") == delta("vllm:prompt_tokens_total")
    assert delta("vllm:request_params_n_count") == requests - 1  # the n = 2 request once
    assert delta("vllm:request_params_n_sum") == requests
    # One inter-token sample per output after the first (no speculative decoding: a token each).
    itl = delta("vllm:generation_tokens_total") - requests
    assert delta("vllm:inter_token_latency_seconds_count") == itl == delta("vllm:time_per_output_token_seconds_count")
    assert delta("vllm:iteration_tokens_total_sum") == delta("vllm:prompt_tokens_total") + delta(
        "vllm:generation_tokens_total")
    e2e, parts = delta("vllm:e2e_request_latency_seconds_sum"), delta("vllm:request_queue_time_seconds_sum") + delta(
        "vllm:request_inference_time_seconds_sum")
    assert 0 < parts <= e2e
    assert v(after, "vllm:kv_cache_usage_perc") == 0 and v(after, "vllm:num_requests_waiting") == 0
    assert v(after, "vllm:prefix_cache_queries_total") >= v(after, "vllm:prefix_cache_hits_total") > 0
    for fam in after.values():  # every vLLM sample names the model, but the info gauges
        if fam.name.startswith("vllm:") and not fam.name.endswith("_info"):
            assert all(lab.items() >= model.items() for _, lab, _ in fam.samples), fam.name
    assert prom_text.value(after, "vllm:cache_config_info", block_size="16", engine="0") == 1
    assert after["pdserve_requests_total"].samples  # pdserve's own metrics are still there
