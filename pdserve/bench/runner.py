"""Run one benchmark programmatically: warm-up, open-loop arrivals, streaming requests, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp

from pdserve.bench.client import DEFAULT_PATHS, Endpoint, EndpointType, RequestRecord, fetch_first_model, send_request
from pdserve.bench.metrics import SLO, BenchMetrics, compute_metrics
from pdserve.bench.phases import Breakdown, PhaseProbe
from pdserve.bench.prompts import build_requests, needs_tokenizer
from pdserve.bench.tokenizer import BenchTokenizer, LocalTokenizer, ServerTokenizer
from pdserve.bench.workload import BenchRequest, RampUp, WorkloadConfig, arrival_offsets

ProgressHook = Callable[[RequestRecord], None]
# vLLM's --percentile-metrics names: the four latencies, and the client-side wait for --max-concurrency
# (scheduled -> sent) alone and added to E2EL. pdserve reports the four by default (vLLM: ttft,tpot,itl).
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el", "client_queue_time", "e2el_including_client_queue")
DEFAULT_PERCENTILE_METRICS = PERCENTILE_METRICS[:4]
READY_RETRY_S = 5.0  # vLLM's ready check retries every 5 s


@dataclass(frozen=True)
class BenchConfig:
    base_url: str  # e.g. http://127.0.0.1:8000
    endpoint: str | None = None  # None: endpoint_type's usual path (/v1/completions, /v1/chat/completions)
    endpoint_type: EndpointType = "completions"
    model: str | None = None  # None: the first model of GET /v1/models
    api_key: str | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 0  # warm-up requests sent (and awaited) first, excluded from the results
    slos: tuple[SLO, ...] = ()
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    timeout_s: float | None = None  # per request
    # Which independent sequence of prompts (workload.make_requests; 1 is the warm-up's). A sweep
    # gives each rate its own, so no rate finds its prompts in a prefix cache an earlier one filled.
    prompt_stream: int = 0
    tokenizer: str | None = None  # a local HF tokenizer directory; None: the server's /tokenize (when needed)
    # vLLM's request options: --served-model-name (the name requests send; `model` stays the result's
    # model_id), --extra-body with the sampling flags, --header, --request-id-prefix, --insecure.
    served_model_name: str | None = None
    extra_body: Mapping[str, object] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    request_id_prefix: str | None = None
    insecure: bool = False  # no TLS certificate check
    ramp_up: RampUp | None = None  # vLLM's --ramp-up-strategy: the rate rises over the run (request_rate unused)
    ready_check_timeout_s: float = 0.0  # > 0: retry the first request until it succeeds, at most this long
    percentile_metrics: tuple[str, ...] = DEFAULT_PERCENTILE_METRICS  # the latencies reported (vLLM's names)
    backend: str | None = None  # vLLM's --backend name as given (vllm, openai, openai-chat), for the result

    @property
    def path(self) -> str:
        return self.endpoint or DEFAULT_PATHS[self.endpoint_type]

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.path.lstrip("/")


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    model_id: str
    date: str  # local time, vLLM's %Y%m%d-%H%M%S
    start_time: float  # time.perf_counter() at the benchmark start; arrival offsets count from here
    duration_s: float
    records: tuple[RequestRecord, ...]  # in request order; raw timestamps kept
    metrics: BenchMetrics
    warmup_failed: int = 0
    tokenizer_id: str | None = None  # the tokenizer that counted the prompts (None: none was needed)
    phases: Breakdown | None = None  # server-side phase means of the timed requests (with a PhaseProbe)
    # With a ramp-up, vLLM's rps_change_events: (integer rate reached, ISO time it was reached).
    rps_change_events: tuple[tuple[int, str], ...] = ()


class _RampEvents:
    """vLLM's rps_change_events: each integer rate the ramp-up passes, with when it was reached."""

    def __init__(self, ramp_up: RampUp | None, n: int) -> None:
        self.rates = ramp_up.rates(n) if ramp_up is not None else None
        self.events: list[tuple[int, str]] = []
        self._last = -1
        if ramp_up is not None:
            self._last = int(ramp_up.start_rps)
            self.events.append((self._last, datetime.now().isoformat()))

    def sent(self, i: int) -> None:
        """Request i is being sent."""
        if self.rates is None:
            return
        rps = int(self.rates[i])
        if rps > self._last:
            now = datetime.now().isoformat()
            self.events += [(r, now) for r in range(self._last + 1, rps + 1)]
            self._last = rps


async def wait_ready(session: aiohttp.ClientSession, endpoint: Endpoint, req: BenchRequest, timeout_s: float,
                     retry_s: float = READY_RETRY_S) -> None:
    """vLLM's --ready-check-timeout-sec: send `req` until it succeeds; RuntimeError after `timeout_s`."""
    deadline = time.perf_counter() + timeout_s
    while True:
        rec = await send_request(session, endpoint, req, request_id=False)
        if rec.success:
            return
        left = deadline - time.perf_counter()
        if left <= 0:
            raise RuntimeError(f"initial test run failed after {timeout_s:g} s: {rec.error}")
        await asyncio.sleep(min(retry_s, left))


async def run_benchmark(cfg: BenchConfig, on_done: ProgressHook | None = None,
                        probe: PhaseProbe | None = None) -> BenchResult:
    """Run `cfg` against the server. Request failures are recorded; setup failures raise RuntimeError
    (no model listed, a tokenizer that fails), an unusable dataset file DatasetError (a ValueError).
    `probe` scrapes the servers' /metrics after the warm-up and after the last request (phases.py)."""
    limit = cfg.max_concurrency or 0
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=60,
                                     ssl=False if cfg.insecure else True)
    async with aiohttp.ClientSession(connector=connector, trust_env=True) as session:
        model = (cfg.served_model_name or cfg.model
                 or await fetch_first_model(session, cfg.base_url, cfg.api_key, cfg.headers))
        chat = cfg.endpoint_type == "chat"
        tok: BenchTokenizer | None = None
        if needs_tokenizer(cfg.workload, chat):
            tok = LocalTokenizer(cfg.tokenizer) if cfg.tokenizer else ServerTokenizer(session, cfg.base_url, model,
                                                                                     cfg.api_key)
        # Prompts are made (and tokenized) before any request is timed.
        requests = await build_requests(cfg.workload, tok, chat, stream=cfg.prompt_stream)
        warm = await build_requests(cfg.workload, tok, chat, stream=1, count=cfg.warmup)
        offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.workload.seed, cfg.ramp_up)
        endpoint = Endpoint(url=cfg.url, model=model, api_key=cfg.api_key, timeout_s=cfg.timeout_s,
                            kind=cfg.endpoint_type, extra_body=cfg.extra_body, extra_headers=cfg.headers,
                            request_id_prefix=cfg.request_id_prefix)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def one(req: BenchRequest, hook: ProgressHook | None, timed: bool = True) -> RequestRecord:
            scheduled = time.perf_counter()
            async with gate if gate is not None else contextlib.nullcontext():
                rec = await send_request(session, endpoint, req, scheduled_time=scheduled, request_id=timed)
            if hook is not None:
                hook(rec)
            return rec

        if cfg.ready_check_timeout_s > 0 and requests:
            await wait_ready(session, endpoint, requests[0], cfg.ready_check_timeout_s)
        warm_records = await asyncio.gather(*(one(r, None, timed=False) for r in warm))
        if probe is not None:
            await probe.start(session)
        date = datetime.now().strftime("%Y%m%d-%H%M%S")
        ramp = _RampEvents(cfg.ramp_up, len(requests))
        start = time.perf_counter()
        tasks: list[Awaitable[RequestRecord]] = []
        for i, (req, offset) in enumerate(zip(requests, offsets, strict=True)):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            ramp.sent(i)
            tasks.append(asyncio.ensure_future(one(req, on_done)))
        records = tuple(await asyncio.gather(*tasks))
        duration = max(time.perf_counter() - start, 1e-9)
        phases = await probe.finish(session) if probe is not None else None
    return BenchResult(
        config=cfg,
        model_id=cfg.model or model,
        date=date,
        start_time=start,
        duration_s=duration,
        records=records,
        metrics=compute_metrics(records, duration, cfg.slos, cfg.percentiles),
        warmup_failed=sum(not r.success for r in warm_records),
        tokenizer_id=tok.tokenizer_id if tok is not None else None,
        phases=phases,
        rps_change_events=tuple(ramp.events),
    )
