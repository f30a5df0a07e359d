"""Streaming client and run_benchmark against an in-process fake OpenAI server on loopback.

The fake server picks its behaviour from the request's model name: "ok", "multi" (two tokens per
chunk), "http500", "error_event" (error after the first token), "no_done" (stream ends without
[DONE]), "hang" (never answers). It serves /v1/completions and /v1/chat/completions (which
announces the role at once, as pdserve does), and vLLM's /tokenize and /detokenize with a byte
tokenizer (`fake_encode`, `fake_render`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from pdserve.bench.client import Endpoint, chat_payload, completion_payload, fetch_first_model, send_request
from pdserve.bench.metrics import parse_slos
from pdserve.bench.runner import BenchConfig, run_benchmark
from pdserve.bench.workload import BenchRequest, WorkloadConfig


def fake_encode(text: str) -> list[int]:
    """The fake server's tokenizer: UTF-8 bytes (no special tokens)."""
    return list(text.encode())


def fake_render(content: str) -> str:
    """The fake server's chat template for one user message, with its generation prompt."""
    return f"<u>{content}</u><a>"


class FakeServer:
    """OpenAI-style streaming /v1/completions in a background thread (usable around asyncio.run)."""

    def __init__(self, gap_s: float = 0.002, api_key: str | None = None, models: tuple[str, ...] = ("ok",)):
        self.gap_s, self.api_key, self.models = gap_s, api_key, models
        self.payloads: list[dict[str, object]] = []
        self.auth_headers: list[str | None] = []
        self.headers: list[dict[str, str]] = []  # every request's
        self.in_flight = self.peak_in_flight = self.tokenize_calls = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def _authorized(self, request: web.Request) -> bool:
        self.auth_headers.append(request.headers.get("Authorization"))
        self.headers.append(dict(request.headers))
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": m, "root": m} for m in self.models]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        self.tokenize_calls += 1
        text = fake_render(body["messages"][0]["content"]) if "messages" in body else body["prompt"]
        ids = fake_encode(text)
        return web.json_response({"count": len(ids), "max_model_len": 4096, "tokens": ids})

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"prompt": bytes(body["tokens"]).decode(errors="replace")})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        self.payloads.append(body)
        chat = "messages" in body
        mode = body["model"]
        if mode == "http500":
            return web.json_response({"error": {"message": "engine dead"}}, status=500)
        if mode == "hang":
            await asyncio.sleep(30)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        n = int(body["max_completion_tokens" if chat else "max_tokens"])
        per_chunk, sent = 2 if mode == "multi" else 1, 0
        if chat:  # the role first, before any token (pdserve's order)
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            await resp.write(f"data: {json.dumps({'choices': [role]})}\n\n".encode())
        try:
            while sent < n:
                await asyncio.sleep(self.gap_s)
                k = min(per_chunk, n - sent)
                sent += k
                if mode == "error_event" and sent > 1:
                    await resp.write(b'data: {"error": {"message": "KV transfer failed", "code": 500}}\n\n')
                    return resp
                piece = {"delta": {"content": "ab"[:k]}} if chat else {"text": "ab"[:k]}
                choice = {"index": 0, **piece, "finish_reason": "length" if sent == n else None}
                await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            prompt = body["prompt"] if not chat else fake_encode(fake_render(body["messages"][0]["content"]))
            usage = {"prompt_tokens": len(prompt if not isinstance(prompt, str) else fake_encode(prompt)),
                     "completion_tokens": n, "total_tokens": 0}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            if mode != "no_done":
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        finally:
            self.in_flight -= 1
        return resp


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as s:
        yield s


def _send(server: FakeServer, model: str, output_len: int = 4, timeout_s: float | None = None, url: str = ""):
    req = BenchRequest(index=3, prompt_token_ids=(5, 6, 7), output_len=output_len)
    endpoint = Endpoint(url=url or server.base_url + "/v1/completions", model=model, timeout_s=timeout_s)

    async def go():
        async with aiohttp.ClientSession() as session:
            return await send_request(session, endpoint, req)

    return asyncio.run(go())


def test_streaming_request_timestamps_every_chunk() -> None:
    with FakeServer(gap_s=0.03) as server:  # chunks apart enough never to share one read on a busy machine
        r = _send(server, "ok", output_len=5)
    assert r.success and r.error == "" and r.index == 3
    assert len(r.chunk_times) == 5 and r.output_tokens == 5 and r.prompt_len == 3
    assert r.send_time < r.chunk_times[0] <= r.chunk_times[-1] <= r.end_time
    assert len(r.itl) == 4 and all(g > 0 for g in r.itl)
    assert r.generated_text == "aaaaa"
    assert server.payloads[0] == {
        "model": "ok",
        "prompt": [5, 6, 7],
        "max_tokens": 5,
        "min_tokens": 5,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_chat_request_payload_and_the_role_chunk_is_not_the_first_token() -> None:
    with FakeServer(gap_s=0.05) as server:
        req = BenchRequest(index=1, prompt_token_ids=(104, 105), output_len=3, prompt_text="hi", ignore_eos=False)
        endpoint = Endpoint(url=server.base_url + "/v1/chat/completions", model="ok", kind="chat")

        async def go():
            async with aiohttp.ClientSession() as session:
                return await send_request(session, endpoint, req)

        r = asyncio.run(go())
    assert r.success and r.output_tokens == 3 and len(r.chunk_times) == 3 and r.generated_text == "aaa"
    assert r.prompt_len == len(fake_encode(fake_render("hi")))  # usage: the rendered prompt
    assert r.ttft is not None and r.ttft >= 0.04  # the first token, not the role sent at once
    assert server.payloads[0] == {
        "model": "ok",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 3,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }  # no ignore_eos / min_tokens: a dataset request without --ignore-eos


def test_text_prompt_to_completions_and_chat_needs_text(server: FakeServer) -> None:
    req = BenchRequest(index=0, prompt_token_ids=(1, 2), output_len=2, prompt_text="hello")
    assert completion_payload("m", req)["prompt"] == "hello"
    assert completion_payload("m", replace(req, prompt_text=None))["prompt"] == [1, 2]
    with pytest.raises(ValueError, match="text prompt"):
        chat_payload("m", replace(req, prompt_text=None))


def test_a_request_with_an_adapter_names_it_as_the_model(server: FakeServer) -> None:
    req = BenchRequest(index=0, prompt_token_ids=(5, 6), output_len=2, model="ok")
    endpoint = Endpoint(url=server.base_url + "/v1/completions", model="base")

    async def go():
        async with aiohttp.ClientSession() as session:
            return await send_request(session, endpoint, req)

    assert asyncio.run(go()).success and server.payloads[0]["model"] == "ok"


def test_multi_token_chunks_follow_vllm_convention(server: FakeServer) -> None:
    r = _send(server, "multi", output_len=5)  # chunks of 2, 2, 1 tokens
    assert r.success and len(r.chunk_times) == 3 and r.output_tokens == 5
    assert len(r.itl) == 2  # one gap per chunk
    assert r.tpot == pytest.approx((r.chunk_times[-1] - r.chunk_times[0]) / 4)  # divided by tokens - 1


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("http500", "HTTP 500"),
        ("error_event", "stream error: KV transfer failed (500)"),
        ("no_done", "stream ended before [DONE]"),
    ],
)
def test_failures_are_recorded(server: FakeServer, model: str, error: str) -> None:
    r = _send(server, model)
    assert not r.success and error in r.error


def test_http_error_body_in_error_text(server: FakeServer) -> None:
    assert "engine dead" in _send(server, "http500").error


def test_timeout_is_recorded(server: FakeServer) -> None:
    r = _send(server, "hang", timeout_s=0.2)
    assert not r.success and r.error == "timeout after 0.2 s"
    assert 0.15 < r.end_time - r.send_time < 5


def test_connection_refused_is_recorded() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens
    r = _send(None, "ok", url=f"http://127.0.0.1:{port}/v1/completions")  # type: ignore[arg-type]
    assert not r.success and "Connect" in r.error and r.chunk_times == ()


def _cfg(server: FakeServer, **kw: object) -> BenchConfig:
    workload = WorkloadConfig(num_prompts=kw.pop("n", 6), input_len=8, output_len=kw.pop("out", 4))  # type: ignore[arg-type]
    return BenchConfig(base_url=server.base_url, workload=workload, **kw)  # type: ignore[arg-type]


def test_run_benchmark_end_to_end_and_recompute_metrics(server: FakeServer) -> None:
    slos = parse_slos(["ttft:10000", "itl_p99:10000"])
    res = asyncio.run(run_benchmark(_cfg(server, request_rate=200.0, slos=slos)))
    assert res.model_id == "ok"  # first of /v1/models
    assert len(res.records) == 6 and [r.index for r in res.records] == list(range(6))
    m = res.metrics
    assert (m.completed, m.failed, m.good_count, m.attainment) == (6, 0, 6, 1.0)
    assert (m.total_input, m.total_output) == (48, 24)
    # recompute from the raw timestamps, independently of metrics.py
    ttfts = [(r.chunk_times[0] - r.send_time) * 1e3 for r in res.records]
    itls = [(b - a) * 1e3 for r in res.records for a, b in zip(r.chunk_times[:-1], r.chunk_times[1:], strict=True)]
    assert m.ttft.mean_ms == pytest.approx(np.mean(ttfts))
    assert m.itl.percentile(99) == pytest.approx(np.percentile(itls, 99))
    assert m.request_goodput == pytest.approx(6 / res.duration_s)
    assert all(r.send_time >= res.start_time for r in res.records)
    assert max(r.end_time for r in res.records) <= res.start_time + res.duration_s


def test_model_api_key_warmup_and_concurrency() -> None:
    with FakeServer(api_key="sekret", models=("multi", "ok"), gap_s=0.005) as server:
        res = asyncio.run(run_benchmark(_cfg(server, n=8, api_key="sekret", warmup=3, max_concurrency=2)))
        assert res.model_id == "multi" and res.warmup_failed == 0
        assert len(server.payloads) == 11 and len(res.records) == 8
        assert set(server.auth_headers) == {"Bearer sekret"}
        assert server.peak_in_flight <= 2 and res.metrics.max_concurrent_requests <= 2
        # warm-ups use other prompts than the measured requests
        measured = {tuple(r.prompt_token_ids) for r in _workload_prompts(8)}
        assert sum(tuple(p["prompt"]) in measured for p in server.payloads[:3]) == 0  # type: ignore[arg-type]

        wrong = asyncio.run(run_benchmark(_cfg(server, n=2, model="ok", api_key="nope")))
        assert wrong.metrics.failed == 2 and "HTTP 401" in wrong.records[0].error


def _workload_prompts(n: int) -> list[BenchRequest]:
    from pdserve.bench.workload import make_requests

    return make_requests(WorkloadConfig(num_prompts=n, input_len=8, output_len=4))


def test_request_rate_spreads_sends(server: FakeServer) -> None:
    res = asyncio.run(run_benchmark(_cfg(server, n=5, request_rate=20.0, burstiness=float("inf"))))
    starts = [r.send_time - res.start_time for r in res.records]
    assert starts == sorted(starts)
    assert starts[-1] == pytest.approx(0.25, abs=0.05)  # 5 requests at 20/s, uniform spacing
    assert res.duration_s >= 0.25


def test_failed_requests_do_not_raise(server: FakeServer) -> None:
    res = asyncio.run(run_benchmark(_cfg(server, model="error_event", slos=parse_slos(["ttft:1e6"]))))
    assert res.metrics.failed == 6 and res.metrics.attainment == 0.0 and res.metrics.request_goodput == 0.0


def test_fetch_first_model_errors(server: FakeServer) -> None:
    async def go(url: str) -> str:
        async with aiohttp.ClientSession() as session:
            return await fetch_first_model(session, url, None)

    assert asyncio.run(go(server.base_url)) == "ok"
    with pytest.raises(RuntimeError, match="HTTP 404"):
        asyncio.run(go(server.base_url + "/nothing"))
