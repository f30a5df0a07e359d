"""vLLM's Prometheus metrics (`vllm:*`), next to pdserve's own, so that vLLM's Grafana dashboard
and alerts work against a pdserve server.

Every name, type, label, unit and bucket here is vLLM v1's (vllm/v1/metrics/loggers.py
`PrometheusStatLogger`, vllm/v1/spec_decode/metrics.py, the NIXL connector's metrics), and so are
the meanings (vllm/v1/metrics/stats.py): every sample but the info gauges carries `model_name` (the
served model name) and `engine` ("0": one engine per server). Counters are exposed as
`<name>_total`, as prometheus_client writes them. Two metrics vLLM has deprecated are kept as
aliases because its dashboard still plots them: `vllm:gpu_cache_usage_perc` and
`vllm:time_per_output_token_seconds` (the inter-token latency histogram under its old name).

Where the values come from: scheduler gauges and lifetime counters are read from the engine's
per-step snapshot at scrape time; `vllm:iteration_tokens_total` is observed by the engine thread
once per step; request histograms are observed once per finished engine request
(`RequestMetrics.finished`), TTFT at its first token and the inter-token latency once per output
(not per token: a speculative step's tokens are one sample, as in vLLM).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.engine import EngineStats
from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec.stats import SpecDecodeStats
from pdserve.kv.connector import KVTransferStats
from pdserve.server.prometheus import Alias, Counter, Gauge, Histogram, LabeledGauge, Registry

ENGINE_INDEX = "0"
FINISH_REASONS = ("stop", "length", "abort", "error")  # vLLM's FinishReason, all exported from the start

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)  # fmt: skip
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)
_NIXL_XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `max_value`."""
    buckets: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


@dataclass(frozen=True)
class VllmInfo:
    """What vLLM's metrics say about this server: `model_name` (the served name),
    `max_model_len` (token-count buckets), the `vllm:cache_config_info` labels, `max_loras`
    (LoRA on) and `num_speculative_tokens` (speculative decoding on)."""

    model_name: str
    max_model_len: int
    cache_config: dict[str, str] = dataclasses.field(default_factory=dict)
    max_loras: int | None = None
    num_speculative_tokens: int | None = None


class ChoiceGroup:
    """The `n` engine requests of one request with n > 1 (vLLM's parent request): vLLM observes
    `n` and the longest choice's token count once, when the last choice ends."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._left = n
        self._longest = 0

    def finish(self, num_generated: int) -> int | None:
        """One choice ended; the longest choice's count once all have, else None."""
        self._longest = max(self._longest, num_generated)
        self._left -= 1
        return self._longest if self._left == 0 else None


class VllmMetrics:
    """vLLM's metrics in `registry`, read from `stats()` (the engine's latest snapshot)."""

    def __init__(self, registry: Registry, info: VllmInfo, stats: Callable[[], EngineStats]) -> None:
        self.info = info
        self._registry = r = registry
        self.labels = labels = (("model_name", info.model_name), ("engine", ENGINE_INDEX))

        def gauge(name: str, help_text: str, read: Callable[[], float], kind: str = "gauge") -> None:
            r.register(Gauge(name, help_text, read, kind=kind, const_labels=labels))

        def counter(name: str, help_text: str, read: Callable[[], float]) -> None:
            gauge(name + "_total", help_text, read, kind="counter")

        def histogram(name: str, help_text: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
            return r.register(Histogram(name, help_text, buckets, const_labels=labels))

        def usage() -> float:
            s = stats()
            return 1.0 - s.num_free_blocks / s.num_total_blocks if s.num_total_blocks else 0.0

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              lambda: stats().num_running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              lambda: stats().num_waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        gauge("vllm:gpu_cache_usage_perc",
              "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
              usage)
        counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                lambda: stats().prefix_cache_queries)
        counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                lambda: stats().prefix_cache_hits)
        counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                lambda: stats().num_preemptions)
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lambda: stats().prompt_tokens)
        counter("vllm:generation_tokens", "Number of generation tokens processed.",
                lambda: stats().generation_tokens)
        self.request_success = r.register(Counter(
            "vllm:request_success_total", "Count of successfully processed requests.", ("finished_reason",),
            const_labels=labels,
        ))  # fmt: skip
        for reason in FINISH_REASONS:
            self.request_success.inc(0, labels=(reason,))

        token_buckets = build_1_2_5_buckets(info.max_model_len)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                       token_buckets)
        self.generation_tokens = histogram("vllm:request_generation_tokens",
                                           "Number of generation tokens processed.", token_buckets)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.", _ITERATION_TOKENS_BUCKETS)
        self.max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
            token_buckets)  # fmt: skip
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.", _N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", token_buckets)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS)
        r.register(Alias("vllm:time_per_output_token_seconds",
                         "Histogram of time per output token in seconds.DEPRECATED: Use "
                         "vllm:inter_token_latency_seconds instead.", self.itl))
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.", _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", _REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        _REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", _REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", _REQUEST_LATENCY_BUCKETS)
        self.prefill_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).", token_buckets)  # fmt: skip

        cache_info = {**info.cache_config, "engine": ENGINE_INDEX}
        r.register(LabeledGauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                tuple(cache_info), lambda: [(tuple(cache_info.values()), 1.0)]))
        if info.max_loras is not None:
            self._attach_lora(info.max_loras, stats)
        if info.num_speculative_tokens is not None:
            self._attach_spec_decode(info.num_speculative_tokens, stats)

    def _attach_lora(self, max_loras: int, stats: Callable[[], EngineStats]) -> None:
        """vLLM's `vllm:lora_requests_info`: labelled by the adapters running and waiting, valued
        with the (wall-clock) time they were seen; earlier label sets keep their last time."""
        seen: dict[tuple[str, ...], float] = {}

        def rows() -> list[tuple[tuple[str, ...], float]]:
            s = stats()
            seen[(str(max_loras), ",".join(s.waiting_loras), ",".join(s.running_loras))] = time.time()
            return list(seen.items())

        self._registry.register(LabeledGauge(
            "vllm:lora_requests_info", "Running stats on lora requests.",
            ("max_lora", "waiting_lora_adapters", "running_lora_adapters"), rows,
        ))  # fmt: skip

    def _attach_spec_decode(self, k: int, stats: Callable[[], EngineStats]) -> None:
        """vLLM's speculative decoding counters (acceptance rate = accepted / draft tokens)."""
        def spec() -> SpecDecodeStats:
            return stats().spec_decode or SpecDecodeStats()

        labels = self.labels
        for name, help_text, read in (
            ("vllm:spec_decode_num_drafts_total", "Number of spec decoding drafts.", lambda: spec().num_drafts),
            ("vllm:spec_decode_num_draft_tokens_total", "Number of draft tokens.", lambda: spec().num_draft_tokens),
            ("vllm:spec_decode_num_accepted_tokens_total", "Number of accepted tokens.",
             lambda: spec().num_accepted_tokens),
        ):
            self._registry.register(Gauge(name, help_text, read, kind="counter", const_labels=labels))

        def per_pos() -> list[tuple[tuple[str, ...], float]]:
            counts = spec().accepted_per_pos
            return [((*(v for _, v in labels), str(i)), counts[i] if i < len(counts) else 0) for i in range(k)]

        gauge = LabeledGauge("vllm:spec_decode_num_accepted_tokens_per_pos_total",
                             "Accepted tokens per draft position.", ("model_name", "engine", "position"), per_pos)
        gauge.kind = "counter"
        self._registry.register(gauge)

    def attach_kv(self, stats: Callable[[], KVTransferStats]) -> Histogram:
        """vLLM's NIXL connector metrics where pdserve's KV transfer stats mean the same; returns the
        transfer-time histogram (fed from the connector's durations by `ServerMetrics.render`)."""
        for name, help_text, read in (
            ("vllm:nixl_num_failed_transfers_total", "Number of failed NIXL KV Cache transfers.",
             lambda: stats().load_failures),
            ("vllm:nixl_num_kv_expired_reqs_total",
             "Number of requests that had their KV expire. NOTE: This metric is tracked on the P instance.",
             lambda: stats().lease_expiries),
        ):
            self._registry.register(Gauge(name, help_text, read, kind="counter", const_labels=self.labels))
        return self._registry.register(Histogram(
            "vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.",
            _NIXL_XFER_TIME_BUCKETS, const_labels=self.labels,
        ))  # fmt: skip

    def finished(
        self, out: StepOutput, arrival: float, first_token: float | None, last_token: float | None, now: float,
        params: SamplingParams | None, choices: ChoiceGroup | None,
    ) -> None:
        """One finished engine request (`out` its final output; times are time.monotonic()). As
        vLLM: queue = first scheduled - queued in the engine, prefill = first token - first
        scheduled, decode = last token - first token, inference = last token - first scheduled
        (preemptions inside them); one never scheduled queued until its end, one without a token
        prefilled until its end. `params`: its sampling parameters (None: not a sampling request);
        `choices`: the group of a request with n > 1."""
        if out.queued_time is None:  # it never reached the engine (aborted before it was sent, refused)
            if choices is not None:
                self._choice_ended(choices, 0)
            return
        self.request_success.inc(labels=(out.finish_reason or "error",))
        self.e2e.observe(now - arrival)
        scheduled = out.scheduled_time
        self.queue_time.observe((scheduled or now) - out.queued_time)
        prefill = decode = inference = 0.0
        if scheduled:
            if first_token is not None and last_token is not None:
                prefill, decode, inference = first_token - scheduled, last_token - first_token, last_token - scheduled
            else:
                prefill = inference = now - scheduled
        self.prefill_time.observe(prefill)
        self.decode_time.observe(decode)
        self.inference_time.observe(inference)
        generated = out.num_output_tokens
        self.request_tpot.observe(decode / (generated - 1) if generated > 1 else 0.0)
        self.prompt_tokens.observe(out.num_prompt_tokens)
        self.generation_tokens.observe(generated)
        self.prefill_kv_computed.observe(out.num_prompt_tokens - out.num_cached_tokens)
        if params is not None:  # vLLM's server always sets max_tokens: the model's length by default
            self.params_max_tokens.observe(
                params.max_tokens if params.max_tokens is not None else self.info.max_model_len - out.num_prompt_tokens
            )
        self._choice_ended(choices, generated)

    def _choice_ended(self, choices: ChoiceGroup | None, generated: int) -> None:
        """`n` and the longest choice, once per request (at its last choice's end)."""
        if choices is None:
            self.params_n.observe(1)
            self.max_num_generation_tokens.observe(generated)
        elif (longest := choices.finish(generated)) is not None:
            self.params_n.observe(choices.n)
            self.max_num_generation_tokens.observe(longest)
