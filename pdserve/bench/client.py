"""Async streaming client for an OpenAI-compatible /v1/completions or /v1/chat/completions endpoint.

Every token-bearing SSE chunk is timestamped with time.perf_counter() on arrival. As in vLLM's
`vllm bench serve`, a chunk that carries several tokens yields one inter-token gap (the time since
the previous chunk), while TPOT divides by the real token count taken from the usage chunk.
A failed request is recorded (success=False, error text), never raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import aiohttp

from pdserve.bench.sse import SSEDecoder, StreamDone, StreamError, TokenChunk, UsageChunk, interpret
from pdserve.bench.workload import BenchRequest

EndpointType = Literal["completions", "chat"]
ENDPOINT_TYPES: tuple[EndpointType, ...] = ("completions", "chat")
DEFAULT_PATHS: dict[EndpointType, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# vLLM's names of the two (its --backend, and "backend" / "endpoint_type" in its result JSON).
VLLM_BACKENDS: dict[EndpointType, str] = {"completions": "openai", "chat": "openai-chat"}
# Every --backend name of vLLM's that pdserve bench sends: its "vllm" is the completions request too.
BACKEND_ENDPOINTS: dict[str, EndpointType] = {"vllm": "completions", "openai": "completions", "openai-chat": "chat"}


@dataclass(frozen=True)
class Endpoint:
    url: str  # full URL, e.g. http://127.0.0.1:8000/v1/completions
    model: str
    api_key: str | None = None
    timeout_s: float | None = None  # whole request, send to last byte
    kind: EndpointType = "completions"  # the request body and stream format
    # vLLM's --extra-body (and sampling flags): merged over every request body, overriding its keys.
    extra_body: Mapping[str, object] = field(default_factory=dict)
    extra_headers: Mapping[str, str] = field(default_factory=dict)  # vLLM's --header, over Authorization
    request_id_prefix: str | None = None  # X-Request-Id = prefix + request index (vLLM's); None: no header

    def headers(self, index: int | None = None) -> dict[str, str]:
        """Request headers; `index` (a benchmark request's) names it with X-Request-Id under a prefix."""
        out = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        out.update(self.extra_headers)
        if self.request_id_prefix is not None and index is not None:
            out["X-Request-Id"] = f"{self.request_id_prefix}{index}"
        return out

    def payload(self, req: BenchRequest) -> dict[str, object]:
        """The streamed request body of `req`, --extra-body merged over it."""
        body = chat_payload(self.model, req) if self.kind == "chat" else completion_payload(self.model, req)
        return {**body, **self.extra_body}


@dataclass(frozen=True)
class RequestRecord:
    """Raw outcome of one request; times are time.perf_counter() seconds, derived metrics in seconds."""

    index: int
    prompt_len: int  # usage.prompt_tokens when reported, else the prompt's length
    expected_output_len: int
    scheduled_time: float  # when the arrival process released it
    send_time: float  # just before the POST (after any concurrency gate)
    end_time: float  # stream finished, or the failure was seen
    chunk_times: tuple[float, ...]  # arrival of each chunk carrying a choice
    output_tokens: int  # usage.completion_tokens when reported, else the number of chunks
    success: bool
    error: str = ""
    generated_text: str = ""
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache (usage), 0 when unreported

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.send_time if self.chunk_times else None

    @property
    def itl(self) -> tuple[float, ...]:
        t = self.chunk_times
        return tuple(b - a for a, b in zip(t[:-1], t[1:], strict=True))

    @property
    def e2el(self) -> float | None:
        """Send to the last token chunk (vLLM's `latency`)."""
        return self.chunk_times[-1] - self.send_time if self.chunk_times else None

    @property
    def tpot(self) -> float:
        """(e2el - ttft) / (output_tokens - 1); 0.0 when fewer than two tokens (vLLM's convention)."""
        if not self.chunk_times or self.output_tokens <= 1:
            return 0.0
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)


def completion_payload(model: str, req: BenchRequest) -> dict[str, object]:
    """A streamed /v1/completions body: the prompt as text when the request has one, else its ids."""
    prompt: str | list[int] = req.prompt_text if req.prompt_text is not None else list(req.prompt_token_ids)
    return {"model": req.model or model, "prompt": prompt, "max_tokens": req.output_len, **_common(req)}


def chat_payload(model: str, req: BenchRequest) -> dict[str, object]:
    """A streamed /v1/chat/completions body: the prompt as one user message (vLLM's openai-chat)."""
    if req.prompt_text is None:
        raise ValueError("a chat request needs a text prompt")
    messages = [{"role": "user", "content": req.prompt_text}]
    return {"model": req.model or model, "messages": messages, "max_completion_tokens": req.output_len,
            **_common(req)}


def _common(req: BenchRequest) -> dict[str, object]:
    exact = {"min_tokens": req.output_len, "ignore_eos": True} if req.ignore_eos else {}
    return {**exact, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


async def send_request(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    req: BenchRequest,
    scheduled_time: float | None = None,
    request_id: bool = True,
) -> RequestRecord:
    """Send `req`, streamed, and record its timing; `request_id` False: no X-Request-Id header
    (a probe or warm-up request, not one of the benchmark's)."""
    chunk_times: list[float] = []
    text: list[str] = []
    usage: UsageChunk | None = None
    done = False
    error = ""
    ctype = ""
    timeout = aiohttp.ClientTimeout(total=endpoint.timeout_s)
    chat = endpoint.kind == "chat"
    payload = endpoint.payload(req)
    send_time = time.perf_counter()
    try:
        async with session.post(
            endpoint.url,
            json=payload,
            headers=endpoint.headers(req.index if request_id else None),
            timeout=timeout,
        ) as resp:
            if resp.status != 200:
                body = (await resp.text(errors="replace")).strip()
                error = f"HTTP {resp.status} {resp.reason or ''}: {body[:500]}".strip()
            else:
                ctype = resp.content_type
                decoder = SSEDecoder()
                async for data in resp.content.iter_any():
                    now = time.perf_counter()
                    for ev in decoder.feed(data):
                        for item in interpret(ev, chat):
                            if isinstance(item, StreamError):
                                error = error or f"stream error: {item.message}"
                            elif done or error:
                                continue  # ignore anything after [DONE] or an error
                            elif isinstance(item, TokenChunk):
                                chunk_times.append(now)
                                text.append(item.text)
                            elif isinstance(item, UsageChunk):
                                usage = item
                            elif isinstance(item, StreamDone):
                                done = True
                    if error:
                        break
                for ev in decoder.close():
                    for item in interpret(ev, chat):
                        done = done or isinstance(item, StreamDone)
                        if isinstance(item, StreamError):
                            error = error or f"stream error: {item.message}"
    except asyncio.TimeoutError:
        error = f"timeout after {endpoint.timeout_s} s"
    except Exception as exc:  # connection refused/reset, payload errors, bad URL...: all recorded
        error = f"{type(exc).__name__}: {exc}"
    end_time = time.perf_counter()
    if not error and not done:
        error = "stream ended before [DONE]" + (f" (content-type {ctype})" if not chunk_times else "")
    if not error and not chunk_times:
        error = "no token chunk received"
    return RequestRecord(
        index=req.index,
        prompt_len=usage.prompt_tokens if usage and usage.prompt_tokens is not None else req.prompt_len,
        expected_output_len=req.output_len,
        scheduled_time=send_time if scheduled_time is None else scheduled_time,
        send_time=send_time,
        end_time=end_time,
        chunk_times=tuple(chunk_times),
        output_tokens=(usage.completion_tokens if usage and usage.completion_tokens is not None else len(chunk_times)),
        success=not error,
        error=error,
        generated_text="".join(text),
        cached_tokens=usage.cached_tokens if usage and usage.cached_tokens is not None else 0,
    )


async def fetch_first_model(session: aiohttp.ClientSession, base_url: str, api_key: str | None,
                            extra_headers: Mapping[str, str] | None = None) -> str:
    """The first model id listed by GET {base_url}/v1/models; RuntimeError when there is none."""
    url = f"{base_url.rstrip('/')}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    headers.update(extra_headers or {})
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {url} -> HTTP {resp.status}: {(await resp.text())[:300]}")
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise RuntimeError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise RuntimeError(f"GET {url}: no model listed")
    return str(data[0]["id"])
