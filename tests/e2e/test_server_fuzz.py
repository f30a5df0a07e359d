"""Schemathesis drives the server's own OpenAPI schema: valid and invalid bodies, never a 5xx, and
the server keeps serving afterwards (a live process on loopback)."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.e2e.conftest import pdserve_server, send_fuzzed

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402


@pytest.fixture(scope="module")
def server(module_tmp):
    with pdserve_server(module_tmp, "--max-model-len", "256") as s:
        yield s


POSTS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize",
         "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


@pytest.mark.parametrize(
    ("path", "mode"),
    [(p, m) for p in POSTS for m in GenerationMode]
    + [("/v1/models", GenerationMode.POSITIVE), ("/health", GenerationMode.POSITIVE)],
)
def test_no_server_errors(server, path, mode):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    method = "POST" if path in POSTS else "GET"
    op = schema[path][method]
    client = httpx.Client(base_url=server.base_url, timeout=60)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        body = case.body if case.body is not schemathesis.core.NOT_SET else None
        for limit in ("max_tokens", "max_output_tokens"):  # keep generation short: this is about validation
            if isinstance(body, dict) and isinstance(body.get(limit), int) and body[limit] > 16:
                body[limit] = 16
        send_fuzzed(client, method, path, body, case.headers or {})

    run()
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    server.wait_metrics({"pdserve_num_requests_running": 0})
