"""The server's Prometheus metrics (`GET /metrics`) and the per-request timer that feeds them:
pdserve's own (`pdserve_*`) and, with a `VllmInfo`, vLLM's (`vllm:*`, server/vllm_metrics.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from pdserve.engine.engine import EngineStats
from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec.stats import SpecDecodeStats
from pdserve.kv.connector import KVTransferStats
from pdserve.server.prometheus import Counter, Gauge, Histogram, Registry
from pdserve.server.vllm_metrics import ChoiceGroup, VllmInfo, VllmMetrics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    """All metrics of one app. Engine gauges read `stats()` (the engine's latest snapshot) per
    scrape; `in_flight()` is the HTTP side's count of admitted, unfinished requests. With `vllm`,
    vLLM's metrics too (`self.vllm`)."""

    def __init__(
        self, stats: Callable[[], EngineStats], in_flight: Callable[[], int], vllm: VllmInfo | None = None
    ) -> None:
        self.registry = r = Registry()
        self._kv_stats: Callable[[], KVTransferStats] | None = None
        self._vllm_kv_times: Histogram | None = None
        gauges = {
            "pdserve_num_requests_running": ("Requests in the engine's running batch.", lambda: stats().num_running),
            "pdserve_num_requests_waiting": ("Requests queued in the engine.", lambda: stats().num_waiting),
            "pdserve_num_requests_in_flight": ("Requests admitted by the server, not yet finished.", in_flight),
            "pdserve_kv_blocks_free": ("Free KV cache blocks.", lambda: stats().num_free_blocks),
            "pdserve_kv_blocks_total": ("KV cache blocks in all.", lambda: stats().num_total_blocks),
            "pdserve_kv_blocks_cached": ("Blocks whose KV the prefix cache can reuse (held or free).",
                                         lambda: stats().num_cached_blocks),
        }
        for name, (help_text, read) in gauges.items():
            r.register(Gauge(name, help_text, read))
        counters = {  # the prefix cache's pair, as vLLM's (hit rate = hits / queries); sliding-window frees
            "pdserve_prefix_cache_queries_total": ("Tokens looked up in the prefix cache.",
                                                   lambda: stats().prefix_cache_queries),
            "pdserve_prefix_cache_hits_total": ("Looked-up tokens found computed.", lambda: stats().prefix_cache_hits),
            "pdserve_kv_blocks_window_freed_total": ("KV blocks freed before their request ended (out of every "
                                                     "layer's sliding window).",
                                                     lambda: stats().num_window_freed_blocks),
        }
        for name, (help_text, read) in counters.items():
            r.register(Gauge(name, help_text, read, kind="counter"))
        if stats().spec_decode is not None:
            self._attach_spec_decode(stats)
        self.prompt_tokens = r.register(Counter("pdserve_prompt_tokens_total", "Prompt tokens of finished requests."))
        self.generation_tokens = r.register(Counter("pdserve_generation_tokens_total", "Tokens generated."))
        self.requests = r.register(
            Counter("pdserve_requests_total", "Finished requests by finish reason.", ("finish_reason",))
        )
        self.ttft = r.register(Histogram(
            "pdserve_time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS
        ))  # fmt: skip
        self.itl = r.register(Histogram(
            "pdserve_inter_token_latency_seconds", "Gap between consecutive generated tokens.", _LATENCY_BUCKETS
        ))  # fmt: skip
        self.e2e = r.register(Histogram(
            "pdserve_e2e_request_latency_seconds", "Arrival to the request's end.", _E2E_BUCKETS
        ))  # fmt: skip
        self.vllm = VllmMetrics(r, vllm, stats) if vllm is not None else None

    def _attach_spec_decode(self, stats: Callable[[], EngineStats]) -> None:
        """vLLM's speculative decoding counters (acceptance rate = accepted / draft tokens)."""
        def spec() -> SpecDecodeStats:
            return stats().spec_decode or SpecDecodeStats()

        counters = {
            "pdserve_spec_decode_num_drafts_total": ("Speculative rows verified (a request's drafts in one step).",
                                                     lambda: spec().num_drafts),
            "pdserve_spec_decode_num_draft_tokens_total": ("Draft tokens proposed and verified.",
                                                           lambda: spec().num_draft_tokens),
            "pdserve_spec_decode_num_accepted_tokens_total": ("Draft tokens the target model accepted.",
                                                              lambda: spec().num_accepted_tokens),
        }
        for name, (help_text, read) in counters.items():
            self.registry.register(Gauge(name, help_text, read, kind="counter"))

    def attach_kv(self, stats: Callable[[], KVTransferStats]) -> None:
        """KV-transfer metrics of a prefill or decode instance (read from the connector's counters)."""
        r = self.registry
        counters = {
            "pdserve_kv_bytes_transferred_total": ("KV bytes moved to or from peers.", lambda: stats().bytes_moved),
            "pdserve_kv_transfers_total": ("Completed KV transfers.", lambda: stats().transfers),
            "pdserve_kv_lease_expiries_total": ("Prefill blocks reclaimed unread.", lambda: stats().lease_expiries),
            "pdserve_kv_load_failures_total": ("KV loads that failed or timed out.", lambda: stats().load_failures),
            "pdserve_kv_handshake_failures_total": ("Failed handshakes.", lambda: stats().handshake_failures),
            "pdserve_kv_prefill_halves_total": ("Requests served as the prefill half (do_remote_decode).",
                                                lambda: stats().prefill_halves),
            "pdserve_kv_decode_halves_total": ("Requests served as the decode half (do_remote_prefill).",
                                               lambda: stats().decode_halves),
        }
        for name, (help_text, read) in counters.items():
            r.register(Gauge(name, help_text, read, kind="counter"))
        r.register(Gauge("pdserve_kv_blocks_held", "Blocks kept for a peer.", lambda: stats().blocks_held))
        self._kv_times = r.register(Histogram(
            "pdserve_kv_transfer_seconds", "Duration of one request's KV transfer.", _LATENCY_BUCKETS
        ))  # fmt: skip
        self._kv_stats = stats
        if self.vllm is not None:
            self._vllm_kv_times = self.vllm.attach_kv(stats)

    def render(self) -> str:
        if self._kv_stats is not None:
            pending = self._kv_stats().transfer_seconds
            while pending:  # appended by the engine thread; popped here only
                seconds = pending.pop(0)
                self._kv_times.observe(seconds)
                if self._vllm_kv_times is not None:
                    self._vllm_kv_times.observe(seconds)
        return self.registry.render()


class RequestTimer:
    """Feeds one engine request's outputs into the metrics: TTFT, every inter-token gap, E2E,
    counts. `params`: its sampling parameters (None: not a sampling request); `choices`: the group
    of a request with n > 1 (vLLM's per-request metrics)."""

    def __init__(
        self, metrics: ServerMetrics, arrival: float | None = None, params: SamplingParams | None = None,
        choices: ChoiceGroup | None = None,
    ) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic() if arrival is None else arrival
        self.params = params
        self.choices = choices
        self._last_token: float | None = None
        self.first_token_time: float | None = None

    def observe(self, out: StepOutput) -> None:
        now = time.monotonic()
        m = self.metrics
        v = m.vllm
        n = len(out.new_token_ids)
        if n:
            if self._last_token is None:
                self.first_token_time = now
                m.ttft.observe(now - self.arrival)
                if v is not None:
                    v.ttft.observe(now - self.arrival)
            else:
                gap = now - self._last_token
                m.itl.observe(gap / n, n)  # pdserve's: one sample per token
                if v is not None:
                    v.itl.observe(gap)  # vLLM's: one per output
            self._last_token = now
            m.generation_tokens.inc(n)
        if out.finished:
            m.prompt_tokens.inc(out.num_prompt_tokens)
            m.requests.inc(labels=(out.finish_reason or "unknown",))
            m.e2e.observe(now - self.arrival)
            if v is not None:
                v.finished(out, self.arrival, self.first_token_time, self._last_token, now, self.params, self.choices)
