"""`/v1/embeddings` with the official `openai` client against a real `pdserve serve` (float and
base64, `dimensions`, batches, errors), and through the proxy in disagg mode (to the prefill)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import TINY_MODEL, ServerProcess, free_port, launch, pdserve_argv, pdserve_server

TEXTS = ["The quick brown fox", "jumps over the lazy dog, " * 4]


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(module_tmp, "--max-model-len", "256") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_float_and_base64(client: openai.OpenAI, server: ServerProcess) -> None:
    floats = client.embeddings.create(model=TINY_MODEL, input=TEXTS[0], encoding_format="float")
    assert floats.object == "list" and floats.model == TINY_MODEL and len(floats.data) == 1
    vec = floats.data[0].embedding
    assert floats.data[0].object == "embedding" and floats.data[0].index == 0
    assert math.isclose(math.fsum(x * x for x in vec), 1.0, rel_tol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == len(TEXTS[0].encode())
    by_default = client.embeddings.create(model=TINY_MODEL, input=TEXTS[0])  # the client asks for base64
    assert by_default.data[0].embedding == pytest.approx(vec, abs=1e-6)
    raw = httpx.post(f"{server.v1_url}/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    assert isinstance(raw["data"][0]["embedding"], str)
    assert raw["usage"] == {"prompt_tokens": len(TEXTS[0].encode()), "total_tokens": len(TEXTS[0].encode())}


def test_batch_and_token_ids(client: openai.OpenAI) -> None:
    one = [client.embeddings.create(model=TINY_MODEL, input=t).data[0].embedding for t in TEXTS]
    batch = client.embeddings.create(model=TINY_MODEL, input=TEXTS)
    assert [d.index for d in batch.data] == [0, 1]
    assert all(_close(d.embedding, v) for d, v in zip(batch.data, one, strict=True))
    assert batch.usage.prompt_tokens == sum(len(t.encode()) for t in TEXTS)
    ids = [list(t.encode()) for t in TEXTS]  # the dummy tokenizer is byte-level
    assert _close(client.embeddings.create(model=TINY_MODEL, input=ids[0]).data[0].embedding, one[0])
    nested = client.embeddings.create(model=TINY_MODEL, input=ids)
    assert all(_close(d.embedding, v) for d, v in zip(nested.data, one, strict=True))


def test_dimensions(client: openai.OpenAI) -> None:
    full = client.embeddings.create(model=TINY_MODEL, input=TEXTS[1]).data[0].embedding
    short = client.embeddings.create(model=TINY_MODEL, input=TEXTS[1], dimensions=8).data[0].embedding
    norm = math.sqrt(math.fsum(x * x for x in full[:8]))
    assert _close(short, [x / norm for x in full[:8]])


def test_truncate_prompt_tokens(client: openai.OpenAI) -> None:
    """vLLM's truncate_prompt_tokens: every input of a batch keeps its last k tokens (usage counts
    them) and is pooled as those k token ids would be; -1 keeps the whole context (256 here)."""
    k = 5
    ids = [list(t.encode()) for t in TEXTS]  # the dummy tokenizer is byte-level
    cut = client.embeddings.create(model=TINY_MODEL, input=TEXTS, extra_body={"truncate_prompt_tokens": k})
    want = client.embeddings.create(model=TINY_MODEL, input=[i[-k:] for i in ids])
    assert cut.usage.prompt_tokens == 2 * k
    assert all(_close(c.embedding, w.embedding) for c, w in zip(cut.data, want.data, strict=True))
    long = "x" * 300
    whole = client.embeddings.create(model=TINY_MODEL, input=long, extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == 256
    last = client.embeddings.create(model=TINY_MODEL, input=list(long.encode())[-256:])
    assert _close(whole.data[0].embedding, last.data[0].embedding)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": ""}, "input", "invalid_value"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": [[]]}, "input", "invalid_value"),
    ({"input": [1] * 257}, "input", "context_length_exceeded"),
    ({"input": [10 ** 9]}, "input", "invalid_value"),
    ({"input": "hi", "dimensions": 100_000}, "dimensions", "invalid_value"),
    ({"input": "hi", "dimensions": 0}, "dimensions", "invalid_value"),
    ({"input": "hi", "encoding_format": "hex"}, "encoding_format", "invalid_value"),
    ({"input": 5}, "input", "invalid_value"),
    ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "invalid_value"),
    ({"input": "hi", "truncate_prompt_tokens": 257}, "truncate_prompt_tokens", "invalid_value"),
    ({}, "input", "missing_field"),
])
def test_bad_requests_are_400(server: ServerProcess, body: dict, param: str, code: str) -> None:
    r = httpx.post(f"{server.v1_url}/embeddings", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error") and err["message"]


def test_errors_through_the_client(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=TINY_MODEL, input="x" * 300)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="hi")
    m = server.wait_metrics({"pdserve_num_requests_running": 0})
    assert m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]


@contextlib.contextmanager
def _proxy(tmp: Path, *args: str) -> Iterator[ServerProcess]:
    port = free_port()
    argv = pdserve_argv("proxy", "--port", str(port), "--no-registry", "--health-interval", "0.2", *args)
    with launch(argv, port, tmp / f"proxy-{port}.log") as proxy:
        yield proxy


def test_disagg_proxy_sends_embeddings_to_the_prefill(module_tmp: Path, client: openai.OpenAI) -> None:
    expected = client.embeddings.create(model=TINY_MODEL, input=TEXTS).data
    halves = ("--kv-mode", "read", "--max-model-len", "256")
    with pdserve_server(module_tmp, "--role", "prefill", *halves) as pre, \
            pdserve_server(module_tmp, "--role", "decode", *halves) as dec, \
            _proxy(module_tmp, "--kv-mode", "read", "--prefill", pre.base_url, "--decode", dec.base_url) as proxy:
        via = openai.OpenAI(base_url=proxy.v1_url, api_key="unused", max_retries=0)
        got = via.embeddings.create(model=TINY_MODEL, input=TEXTS).data
        assert all(_close(g.embedding, e.embedding) for g, e in zip(got, expected, strict=True))
        tokens = float(sum(len(t.encode()) for t in TEXTS))
        pre.wait_metrics({"pdserve_prompt_tokens_total": tokens, 'pdserve_requests_total{finish_reason="stop"}': 2.0})
        assert dec.metrics().get("pdserve_prompt_tokens_total", 0.0) == 0.0
        with pytest.raises(openai.BadRequestError):
            via.embeddings.create(model=TINY_MODEL, input="")
        m = pre.wait_metrics({"pdserve_num_requests_running": 0})
        assert m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]
