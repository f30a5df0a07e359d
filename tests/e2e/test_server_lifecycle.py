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

from tests.e2e.conftest import ServerProcess, pdserve_server

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
