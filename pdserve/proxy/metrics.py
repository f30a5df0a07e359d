"""The proxy's Prometheus metrics (`GET /metrics`).

Outcomes of client requests, retries, fallbacks, upstream failures, registrations, per-instance
load and health, and the proxy's own latency: arrival -> first upstream request sent, and
upstream first byte -> first byte written to the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdserve.proxy.instances import ROLE_NAMES, InstanceTable
from pdserve.proxy.registry import RegistryStats
from pdserve.server.prometheus import Counter, Gauge, Histogram, Registry

Rows = list[tuple[tuple[str, ...], float]]
_OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class LabeledCallback(Gauge):
    """Labelled samples read from a callback at scrape time (a gauge, or a counter kept elsewhere)."""

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str], read: Callable[[], Rows], kind: str = "gauge"
    ) -> None:
        super().__init__(name, help_text, lambda: 0.0)
        self.label_names = tuple(label_names)
        self.kind = kind
        self._rows = read

    def samples(self) -> list[str]:
        out = []
        for values, v in self._rows():
            labels = ",".join(f'{n}="{_escape(x)}"' for n, x in zip(self.label_names, values, strict=True))
            out.append(f"{self.name}{{{labels}}} {v:g}")
        return out


class ProxyMetrics:
    def __init__(self, table: InstanceTable, registrations: RegistryStats | None) -> None:
        self.registry = r = Registry()
        self.requests = r.register(Counter(
            "pdserve_proxy_requests_total",
            "Client requests by outcome (ok, client_error, upstream_error, stream_error, unavailable, "
            "cancelled, internal_error).", ("outcome",),
        ))
        self.retries = r.register(Counter(
            "pdserve_proxy_retries_total", "Calls retried on another instance, by role.", ("role",)
        ))
        self.fallbacks = r.register(Counter(
            "pdserve_proxy_fallbacks_total",
            "Requests prefilled on the decode instance, by reason (no_prefill, prefill_failed, no_params, "
            "echo, prompt_logprobs, batch, truncate_prompt_tokens, beam_search, previous_response).",
            ("reason",),
        ))
        self.prefill_only = r.register(Counter(
            "pdserve_proxy_prefill_only_total",
            "Requests sent whole to a prefill instance, no KV moved, by reason (embeddings, one_token).",
            ("reason",),
        ))
        self.same_instance = r.register(Counter(
            "pdserve_proxy_same_instance_total",
            "Requests whose prefill and decode picks were one both instance: sent to it plain (no failure).",
            (),
        ))
        self.upstream_failures = r.register(Counter(
            "pdserve_proxy_upstream_failures_total", "Failed upstream calls by role and kind.", ("role", "kind")
        ))
        self.request_overhead = r.register(Histogram(
            "pdserve_proxy_request_overhead_seconds",
            "Proxy time from a request's arrival to its first upstream request being sent.", _OVERHEAD_BUCKETS,
        ))
        self.response_overhead = r.register(Histogram(
            "pdserve_proxy_response_overhead_seconds",
            "Proxy time from the upstream's first byte to the first byte written to the client.",
            _OVERHEAD_BUCKETS,
        ))

        def per_instance(value: Callable[..., float]) -> Callable[[], Rows]:
            return lambda: [((i.address, ROLE_NAMES[i.role]), value(i)) for i in table.all()]

        labels = ("instance", "role")
        r.register(LabeledCallback(
            "pdserve_proxy_instance_in_flight", "Upstream calls in flight per instance.", labels,
            per_instance(lambda i: i.in_flight),
        ))
        r.register(LabeledCallback(
            "pdserve_proxy_instance_healthy", "1 when the instance is healthy (routable).", labels,
            per_instance(lambda i: float(i.healthy)),
        ))
        r.register(LabeledCallback(
            "pdserve_proxy_instance_requests_total", "Upstream calls started per instance.", labels,
            per_instance(lambda i: i.requests), kind="counter",
        ))
        if registrations is not None:
            stats = registrations
            r.register(LabeledCallback(
                "pdserve_proxy_registrations_total", "Registration messages received, by result.", ("result",),
                lambda: [(("accepted",), stats.accepted), (("refused",), stats.refused),
                         (("malformed",), stats.malformed)],
                kind="counter",
            ))

    def render(self) -> str:
        return self.registry.render()
