"""The app in-process (httpx's ASGI transport) over a real tiny engine: engine failures become an
SSE error event (streaming) or a 500 body (not streaming); a drain answers 503."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import StepOutput
from pdserve.server.app import build_app
from pdserve.server.context import ServerContext
from pdserve.server.settings import ServerSettings

MODEL = "dummy:qwen3-tiny"


@pytest.fixture
def ctx(engine: AsyncEngine) -> Iterator[ServerContext]:
    yield ServerContext(engine, ServerSettings(served_model_names=(MODEL,)))
    engine.engine.__dict__.pop("step", None)  # undo a failing step installed by a test


def fail_after(engine: AsyncEngine, good_steps: int) -> None:
    """Make the engine's step raise after `good_steps` successful ones (as a model crash would)."""
    original = type(engine.engine).step
    calls = 0

    def step(self: LLMEngine = engine.engine) -> list[StepOutput]:
        nonlocal calls
        calls += 1
        if calls > good_steps:
            raise RuntimeError("simulated device failure")
        return original(self)

    engine.engine.step = step  # type: ignore[method-assign]


def call(ctx: ServerContext, method: str, path: str, body: object | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, json=body)

    return asyncio.run(go())


def events(r: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in r.text.split("\n\n") if line.startswith("data: ")]


def test_stream_then_engine_error_event(ctx: ServerContext) -> None:
    fail_after(ctx.engine, 3)
    body = {"prompt": "hello", "max_tokens": 50, "ignore_eos": True, "stream": True}
    r = call(ctx, "POST", "/v1/completions", body)
    assert r.status_code == 200
    evs = events(r)
    assert evs[-1] == "[DONE]"
    err = json.loads(evs[-2])["error"]
    assert "simulated device failure" in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert all("choices" in json.loads(e) for e in evs[:-2]) and len(evs) >= 4
    assert 'pdserve_requests_total{finish_reason="error"} 1' in ctx.metrics.render()


def test_chat_stream_engine_error_event(ctx: ServerContext) -> None:
    fail_after(ctx.engine, 0)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    evs = events(call(ctx, "POST", "/v1/chat/completions", body))
    assert json.loads(evs[0])["choices"][0]["delta"]["role"] == "assistant"
    assert "error" in json.loads(evs[-2]) and evs[-1] == "[DONE]"


def test_non_stream_engine_error_is_500(ctx: ServerContext) -> None:
    fail_after(ctx.engine, 1)
    r = call(ctx, "POST", "/v1/completions", {"prompt": "hello", "max_tokens": 20, "ignore_eos": True})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"
    assert ctx.admission.num_in_flight == 0


def test_engine_recovers_after_a_failed_step(ctx: ServerContext) -> None:
    r = call(ctx, "POST", "/v1/completions", {"prompt": "hello", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


def test_drain_refuses_new_requests(ctx: ServerContext) -> None:
    assert call(ctx, "GET", "/health").status_code == 200
    assert call(ctx, "POST", "/ping").status_code == 200  # vLLM's SageMaker check: /health's answer
    ctx.begin_drain()
    assert call(ctx, "GET", "/health").status_code == 503
    assert call(ctx, "GET", "/ping").status_code == call(ctx, "POST", "/ping").status_code == 503
    r = call(ctx, "POST", "/v1/completions", {"prompt": "hello"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
    assert call(ctx, "GET", "/metrics").status_code == 200
