"""Run one benchmark programmatically: warm-up, open-loop arrivals, streaming requests, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp

from pdserve.bench.client import DEFAULT_PATHS, Endpoint, EndpointType, RequestRecord, fetch_first_model, send_request
from pdserve.bench.metrics import SLO, BenchMetrics, compute_metrics
from pdserve.bench.phases import Breakdown, PhaseProbe
from pdserve.bench.prompts import build_requests, needs_tokenizer
from pdserve.bench.tokenizer import BenchTokenizer, LocalTokenizer, ServerTokenizer
from pdserve.bench.workload import BenchRequest, WorkloadConfig, arrival_offsets

ProgressHook = Callable[[RequestRecord], None]


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


async def run_benchmark(cfg: BenchConfig, on_done: ProgressHook | None = None,
                        probe: PhaseProbe | None = None) -> BenchResult:
    """Run `cfg` against the server. Request failures are recorded; setup failures raise RuntimeError
    (no model listed, a tokenizer that fails), an unusable dataset file DatasetError (a ValueError).
    `probe` scrapes the servers' /metrics after the warm-up and after the last request (phases.py)."""
    limit = cfg.max_concurrency or 0
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, trust_env=True) as session:
        model = cfg.model or await fetch_first_model(session, cfg.base_url, cfg.api_key)
        chat = cfg.endpoint_type == "chat"
        tok: BenchTokenizer | None = None
        if needs_tokenizer(cfg.workload, chat):
            tok = LocalTokenizer(cfg.tokenizer) if cfg.tokenizer else ServerTokenizer(session, cfg.base_url, model,
                                                                                     cfg.api_key)
        # Prompts are made (and tokenized) before any request is timed.
        requests = await build_requests(cfg.workload, tok, chat, stream=cfg.prompt_stream)
        warm = await build_requests(cfg.workload, tok, chat, stream=1, count=cfg.warmup)
        offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.workload.seed)
        endpoint = Endpoint(url=cfg.url, model=model, api_key=cfg.api_key, timeout_s=cfg.timeout_s,
                            kind=cfg.endpoint_type)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def one(req: BenchRequest, hook: ProgressHook | None) -> RequestRecord:
            scheduled = time.perf_counter()
            async with gate if gate is not None else contextlib.nullcontext():
                rec = await send_request(session, endpoint, req, scheduled_time=scheduled)
            if hook is not None:
                hook(rec)
            return rec

        warm_records = await asyncio.gather(*(one(r, None) for r in warm))
        if probe is not None:
            await probe.start(session)
        date = datetime.now().strftime("%Y%m%d-%H%M%S")
        start = time.perf_counter()
        tasks: list[Awaitable[RequestRecord]] = []
        for req, offset in zip(requests, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(req, on_done)))
        records = tuple(await asyncio.gather(*tasks))
        duration = max(time.perf_counter() - start, 1e-9)
        phases = await probe.finish(session) if probe is not None else None
    return BenchResult(
        config=cfg,
        model_id=model,
        date=date,
        start_time=start,
        duration_s=duration,
        records=records,
        metrics=compute_metrics(records, duration, cfg.slos, cfg.percentiles),
        warmup_failed=sum(not r.success for r in warm_records),
        tokenizer_id=tok.tokenizer_id if tok is not None else None,
        phases=phases,
    )
