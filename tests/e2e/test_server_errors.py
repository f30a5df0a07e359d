"""Bad input over raw HTTP: each gets the right status and an OpenAI-style error body, never a
500, and the server keeps serving."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ServerProcess, pdserve_server

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_LEN = 512
MAX_BODY = 64 * 1024
VOCAB = 512  # dummy:qwen3-tiny


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(
        module_tmp,
        "--api-key",
        KEY,
        "--max-model-len",
        str(MAX_LEN),
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-num-seqs",
        "2",
        "--max-queued-requests",
        "1",
        "--served-model-name",
        "tiny",
        "tiny-alias",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        yield c


def assert_error(r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err["message"]


def post(
    http: httpx.Client, body: object, path: str = "/v1/completions", headers: dict[str, str] | None = None
) -> httpx.Response:
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})


def test_invalid_json(http: httpx.Client) -> None:
    r = http.post("/v1/completions", content=b'{"prompt": "hi",', headers={"Content-Type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    assert_error(http.post("/v1/completions", content=b""), 400, code="invalid_json")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 4}, "prompt"),  # missing
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "stop": 3}, "stop"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "n": 17}, "n"),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"prompt": "hi", "logit_bias": {"100000000": 1}}, "logit_bias"),
        ({"prompt": "hi", "echo": "yes"}, "echo"),
        ({"prompt": "hi", "max_tokens": 0, "echo": False}, "max_tokens"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "logprobs": -1}, "logprobs"),
        ({"prompt": "hi", "logprobs": True}, "logprobs"),
        ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "hi", "repetition_penalty": -1}, "repetition_penalty"),
        ({"prompt": "hi", "seed": -(2**63) - 1}, None),  # beyond torch.Generator: was a 500
        ([1, 2], None),
    ],
)
def test_bad_fields(http: httpx.Client, body: object, param: str | None) -> None:
    assert_error(post(http, body), 400, param=param)


def test_bad_chat_fields(http: httpx.Client) -> None:
    assert_error(post(http, {"messages": []}, "/v1/chat/completions"), 400, param="messages")
    bad_role = {"messages": [{"role": "wizard", "content": "hi"}]}
    assert_error(post(http, bad_role, "/v1/chat/completions"), 400)
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert_error(post(http, image, "/v1/chat/completions"), 400)
    assert_error(
        post(
            http, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "/v1/chat/completions"
        ),
        400,
        param="max_completion_tokens",
    )


@pytest.mark.parametrize(
    "kvp", [{"remote_port": "not a port"}, {"do_remote_decode": True}, {"do_remote_prefill": True}, "x"]
)
def test_bad_kv_transfer_params(http: httpx.Client, kvp: object) -> None:
    assert_error(post(http, {"prompt": "hi", "kv_transfer_params": kvp}), 400, param="kv_transfer_params")


def test_batch_beyond_the_choice_limit_rejected(http: httpx.Client) -> None:
    msg = assert_error(post(http, {"prompt": ["a"] * 20, "n": 16}), 400)
    assert "exceeds 256 choices" in msg


def test_batch_with_a_bad_prompt_starts_nothing(server: ServerProcess, http: httpx.Client) -> None:
    """A batch whose second prompt the engine refuses: a 400 naming the problem, and nothing left
    behind (the first prompt's request, already admitted, is aborted; in flight 0, blocks free)."""
    msg = assert_error(post(http, {"prompt": [[65, 66], [10**6]], "max_tokens": 500, "ignore_eos": True}), 400)
    assert "out of range" in msg
    total = server.metrics()["pdserve_kv_blocks_total"]
    server.wait_metrics({"pdserve_num_requests_in_flight": 0, "pdserve_kv_blocks_free": total}, timeout=5)


def test_max_tokens_beyond_context(http: httpx.Client) -> None:
    msg = assert_error(post(http, {"prompt": "hello", "max_tokens": MAX_LEN}), 400, code="context_length_exceeded")
    assert str(MAX_LEN) in msg


def test_prompt_too_long(http: httpx.Client) -> None:
    n = MAX_LEN + 10
    msg = assert_error(post(http, {"prompt": [65] * n, "max_tokens": 1}), 400, code="context_length_exceeded")
    assert str(n) in msg and str(MAX_LEN) in msg
    chat = {"messages": [{"role": "user", "content": "x" * n}]}
    assert_error(post(http, chat, "/v1/chat/completions"), 400, code="context_length_exceeded")


@pytest.mark.parametrize("bad", [VOCAB, -1, 10**12])
def test_token_ids_out_of_vocab(http: httpx.Client, bad: int) -> None:
    msg = assert_error(post(http, {"prompt": [1, 2, bad], "max_tokens": 1}), 400, param="prompt")
    assert str(VOCAB) in msg


def test_oversized_body_by_content_length(server: ServerProcess) -> None:
    body = json.dumps({"prompt": "x" * (MAX_BODY * 4)}).encode()
    r = httpx.post(f"{server.v1_url}/completions", content=body, headers=AUTH)
    assert_error(r, 413, code="request_too_large")


def test_oversized_chunked_body(server: ServerProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 1024 * 2):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(f"{server.v1_url}/completions", content=chunks(), headers=AUTH)
    assert_error(r, 413, code="request_too_large")


def test_unknown_model(http: httpx.Client) -> None:
    assert_error(post(http, {"model": "gpt-9", "prompt": "hi"}), 404, code="model_not_found", param="model")
    chat = {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(http, chat, "/v1/chat/completions"), 404, code="model_not_found")
    for name in ("tiny", "tiny-alias"):
        ok = post(http, {"model": name, "prompt": "hi", "max_tokens": 1})
        assert ok.status_code == 200 and ok.json()["model"] == "tiny"


def test_api_key(server: ServerProcess) -> None:
    url = f"{server.v1_url}/completions"
    body = {"prompt": "hi", "max_tokens": 1}
    assert_error(httpx.post(url, json=body), 401, code="invalid_api_key")
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.get(f"{server.v1_url}/models"), 401)
    assert httpx.get(f"{server.v1_url}/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_request_id_rules(http: httpx.Client) -> None:
    assert_error(post(http, {"prompt": "hi"}, headers={"X-Request-Id": "bad id!"}), 400, param="X-Request-Id")
    # As long as the context allows, so the first is still in flight when its duplicate arrives. On
    # an idle machine the tiny model can finish it first (then the id is free again: a 200); retry.
    body = {"prompt": "hi", "max_tokens": MAX_LEN - 10, "ignore_eos": True, "stream": True}
    statuses = []
    for attempt in range(5):
        rid = f"dup-{attempt}"
        with http.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": rid}) as first:
            assert first.status_code == 200
            next(first.iter_lines())
            r = post(http, {"prompt": "hi", "max_tokens": 1}, headers={"X-Request-Id": rid})
        statuses.append(r.status_code)
        if r.status_code != 200:
            break
    assert_error(r, 409, code="duplicate_request_id")
    assert all(s == 200 for s in statuses[:-1]), statuses


def test_queue_full_429(server: ServerProcess, http: httpx.Client) -> None:
    # --max-num-seqs 2 + --max-queued-requests 1: three long requests in flight fill it.
    body = {"prompt": "hi", "max_tokens": MAX_LEN - 10, "ignore_eos": True, "stream": True}
    server.wait_metrics({"pdserve_num_requests_in_flight": 0})  # earlier tests' aborts have landed
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            resp = stack.enter_context(http.stream("POST", "/v1/completions", json=body))
            assert resp.status_code == 200  # headers are sent at admission, before any token
        r = post(http, {"prompt": "hi", "max_tokens": 1})
        assert_error(r, 429, code="too_many_requests")
        assert int(r.headers["retry-after"]) >= 1
    server.wait_metrics({"pdserve_num_requests_in_flight": 0, "pdserve_num_requests_running": 0})


def test_still_serving_and_no_500(server: ServerProcess, http: httpx.Client) -> None:
    r = post(http, {"prompt": "still here", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert server.metrics().get('pdserve_requests_total{finish_reason="error"}', 0) == 0
    assert "unhandled error" not in server.log() and "Traceback" not in server.log()
