"""Schemathesis drives the proxy's own OpenAPI schema (GET /openapi.json), in standard mode (one
standalone instance) and in disagg READ and WRITE modes (one prefill, one decode): valid and invalid
bodies on every documented route, never a 5xx from the proxy nor from an instance behind it (a hidden
one: a retried or fallen-back call), the proxy still healthy afterwards and every KV block free again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.e2e.conftest import (
    ServerProcess,
    free_port,
    launch,
    parse_metrics,
    pdserve_argv,
    pdserve_server,
    send_fuzzed,
)

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

MAX_TOKENS = 8  # generated bodies are capped: this is about validation, not generation
INSTANCE = ("--max-model-len", "256")
GENERATION = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings")
TOKENIZER = ("/tokenize", "/detokenize")  # forwarded to an instance as they are
LORA = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # fanned out to every instance
POSTS = GENERATION + TOKENIZER + LORA
GETS = (
    "/health",
    "/instances",
    "/metrics",
    "/v1/models",
    "/v1/responses/{response_id}",
    "/v1/responses/{response_id}/input_items",
    "/ping",
    "/version",
)
ADMIN_POSTS = ("/reset_prefix_cache",)  # no body
RESPONSE_CALLS = (("DELETE", "/v1/responses/{response_id}"), ("POST", "/v1/responses/{response_id}/cancel"))
OTHER_CALLS = (("POST", "/ping"),)  # vLLM's SageMaker health check answers POST as well as GET
HIDDEN_5XX = (  # proxy metrics that count a 5xx the client may not have seen (retried, fallen back, in-band)
    "pdserve_proxy_upstream_failures_total",
    "pdserve_proxy_fallbacks_total",
    'pdserve_proxy_requests_total{outcome="internal_error"}',
    'pdserve_proxy_requests_total{outcome="upstream_error"}',
    'pdserve_proxy_requests_total{outcome="stream_error"}',
    'pdserve_proxy_requests_total{outcome="unavailable"}',
)


@dataclass
class Topology:
    proxy: ServerProcess
    instances: list[ServerProcess]


@contextlib.contextmanager
def _proxy(tmp: Path, *args: str) -> Iterator[ServerProcess]:
    port = free_port()
    argv = pdserve_argv("proxy", "--port", str(port), "--no-registry", "--health-interval", "0.2", *args)
    with launch(argv, port, tmp / f"proxy-{port}.log") as proxy:  # /health is 200 once its instances are
        yield proxy
        assert proxy.stop() == 0, proxy.log()  # SIGTERM: graceful exit 0


@pytest.fixture(scope="module", params=["standard", "disagg-read", "disagg-write"])
def topo(request: pytest.FixtureRequest, module_tmp: Path) -> Iterator[Topology]:
    if request.param == "standard":
        with (
            pdserve_server(module_tmp, *INSTANCE) as s,
            _proxy(module_tmp, "--mode", "standard", "--instance", s.base_url) as p,
        ):
            yield Topology(p, [s])
        return
    kv_mode = request.param.removeprefix("disagg-")
    with (
        pdserve_server(module_tmp, *INSTANCE, "--role", "prefill", "--kv-mode", kv_mode) as pre,
        pdserve_server(module_tmp, *INSTANCE, "--role", "decode", "--kv-mode", kv_mode) as dec,
        _proxy(
            module_tmp, "--mode", "disagg", "--kv-mode", kv_mode, "--prefill", pre.base_url, "--decode", dec.base_url
        ) as p,
    ):
        yield Topology(p, [pre, dec])


def _cap(body: object) -> None:
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS


def test_schema_documents_every_route_and_body(topo: Topology) -> None:
    """Every documented route is fuzzed below; the generation paths declare their request bodies."""
    spec = httpx.get(f"{topo.proxy.base_url}/openapi.json").json()
    expected = {**{p: {"post"} for p in POSTS + ADMIN_POSTS}, **{p: {"get"} for p in GETS}}
    for method, path in RESPONSE_CALLS + OTHER_CALLS:
        expected.setdefault(path, set()).add(method.lower())
    assert {p: set(ops) for p, ops in spec["paths"].items()} == expected
    fields = {
        p: set(spec["paths"][p]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"])
        for p in POSTS
    }
    assert {"model", "prompt", "max_tokens", "stream"} <= fields["/v1/completions"]
    assert {"model", "messages", "max_completion_tokens", "stream"} <= fields["/v1/chat/completions"]
    assert {"model", "input", "max_output_tokens", "previous_response_id", "stream"} <= fields["/v1/responses"]
    assert {"prompt", "messages"} <= fields["/tokenize"] and {"tokens"} <= fields["/detokenize"]


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [("POST", p, m) for p in POSTS for m in GenerationMode]
    + [("GET" if p in GETS else "POST", p, GenerationMode.POSITIVE) for p in GETS + ADMIN_POSTS]
    + [(m, p, GenerationMode.POSITIVE) for m, p in RESPONSE_CALLS + OTHER_CALLS],
)
def test_no_server_errors(
    topo: Topology, method: str, path: str, mode: GenerationMode, request: pytest.FixtureRequest
) -> None:
    proxy = topo.proxy
    schema = schemathesis.openapi.from_url(f"{proxy.base_url}/openapi.json")
    op = schema[path][method]
    client = httpx.Client(base_url=proxy.base_url, timeout=60)
    request.addfinalizer(client.close)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        body = case.body if case.body is not schemathesis.core.NOT_SET else None
        _cap(body)
        r = send_fuzzed(client, method, path, body, case.headers or {})
        if r.headers.get("content-type", "").startswith("text/event-stream"):  # a 5xx in-band, after a 200
            assert '"server_error"' not in r.text, f"error event for {body!r}: {r.text[-300:]}"

    run()
    assert httpx.get(f"{proxy.base_url}/health").status_code == 200
    metrics = parse_metrics(httpx.get(f"{proxy.base_url}/metrics").text)
    by_design = (
        'pdserve_proxy_fallbacks_total{reason="echo"}',
        'pdserve_proxy_fallbacks_total{reason="batch"}',
        'pdserve_proxy_fallbacks_total{reason="previous_response"}',
        'pdserve_proxy_fallbacks_total{reason="prompt_logprobs"}',
        'pdserve_proxy_fallbacks_total{reason="truncate_prompt_tokens"}',
        'pdserve_proxy_fallbacks_total{reason="beam_search"}',
    )
    hidden = {k: v for k, v in metrics.items() if v and k.startswith(HIDDEN_5XX) and k not in by_design}
    assert not hidden, f"5xx behind the proxy's back: {hidden}"
    for inst in topo.instances:
        total = inst.metrics()["pdserve_kv_blocks_total"]
        inst.wait_metrics({"pdserve_num_requests_running": 0, "pdserve_kv_blocks_free": total})


def test_decode_only_rejection_frees_the_prefill_blocks(topo: Topology) -> None:
    """What the fuzzer found (disagg READ; in WRITE the same, the halves running at once): a body that
    only the decode half can judge (the proxy sends the prefill max_tokens=1 and no min_tokens) was
    prefilled, then refused by decode, and the prefill kept its KV blocks for the whole lease (30 s).
    The proxy now tells the prefill to free them (notify `Abort`)."""
    if len(topo.instances) < 2:
        pytest.skip("standard mode: no prefill half")
    prefill = topo.instances[0]
    total = prefill.metrics()["pdserve_kv_blocks_total"]
    # Warm (a cold prefill is still computing when decode refuses, and closing its connection aborts it).
    warm = httpx.post(f"{topo.proxy.v1_url}/completions", json={"prompt": "warm", "max_tokens": 2}, timeout=30)
    assert warm.status_code == 200, warm.text
    for bad in ({"max_tokens": -1}, {"max_tokens": 2, "min_tokens": 5}, {"max_tokens": 10_000}):
        r = httpx.post(f"{topo.proxy.v1_url}/completions", json={"prompt": "a prompt " * 20, **bad}, timeout=30)
        assert r.status_code == 400, r.text
        prefill.wait_metrics({"pdserve_kv_blocks_free": total, "pdserve_kv_blocks_held": 0}, timeout=3)
