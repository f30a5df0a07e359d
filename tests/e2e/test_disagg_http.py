"""Prefill and decode instances as real processes over HTTP; this test plays the proxy's part.

Read mode: prefill first (max_tokens=1, do_remote_decode), then decode with the returned
kv_transfer_params. Write mode: both at once, each told the other's KV ports.
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import uuid
from contextlib import ExitStack

import httpx
import pytest

from tests.e2e.conftest import pdserve_server

PROMPTS = [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate((3, 37, 150, 64))]
BODY = {"model": "dummy:qwen3-tiny", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def complete(base: str, prompt, extra: dict | None = None, rid: str | None = None, **kw) -> dict:
    headers = {"X-Request-Id": rid} if rid else {}
    r = httpx.post(f"{base}/v1/completions", json={**BODY, "prompt": prompt, **kw, **(extra or {})},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def disagg(p, d, prompt, mode: str, both: dict | None = None, **kw) -> dict:
    """The proxy's part: `both` goes into the two halves' bodies, `kw` into the decode's."""
    rid, both = uuid.uuid4().hex, both or {}
    if mode == "read":
        pr = complete(p.base_url, prompt, {"max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True},
                                           **both}, rid)
        return complete(d.base_url, prompt, {"kv_transfer_params": pr["kv_transfer_params"], **both}, rid, **kw)
    pinfo = httpx.get(f"{p.base_url}/kv_info").json()
    dinfo = httpx.get(f"{d.base_url}/kv_info").json()
    to_p = {"max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "transfer_mode": "WRITE", "remote_engine_id": dinfo["engine_id"],
        "remote_host": dinfo["host"], "remote_handshake_port": dinfo["handshake_port"],
        "remote_notify_port": dinfo["notify_port"]}, **both}
    to_d = {**both, "kv_transfer_params": {
        "do_remote_prefill": True, "transfer_mode": "WRITE", "remote_engine_id": pinfo["engine_id"],
        "remote_host": pinfo["host"], "remote_handshake_port": pinfo["handshake_port"],
        "remote_notify_port": pinfo["notify_port"]}}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fp = pool.submit(complete, p.base_url, prompt, to_p, rid)
        fd = pool.submit(complete, d.base_url, prompt, to_d, rid, **kw)
        fp.result()
        return fd.result()


def blocks_back(*servers) -> None:
    for s in servers:
        total = s.metrics()["pdserve_kv_blocks_total"]
        s.wait_metrics({"pdserve_kv_blocks_free": total}, timeout=30)


@pytest.mark.parametrize(
    ("mode", "transport"), [("read", "auto"), ("write", "auto"), ("read", "tcp"), ("write", "tcp")]
)
def test_disagg_over_http_equals_standalone(module_tmp, mode, transport):
    flags = ("--kv-mode", mode, "--kv-transport", transport, "--max-num-batched-tokens", "32")
    with ExitStack() as st:
        s = st.enter_context(pdserve_server(module_tmp, "--max-num-batched-tokens", "32"))
        p = st.enter_context(pdserve_server(module_tmp, "--role", "prefill", *flags))
        d = st.enter_context(pdserve_server(module_tmp, "--role", "decode", *flags))
        for prompt in PROMPTS:
            ref = complete(s.base_url, prompt)["choices"][0]
            got = disagg(p, d, prompt, mode)["choices"][0]
            assert got["text"] == ref["text"] and got["finish_reason"] == "length"
        m = d.metrics() if mode == "read" else p.metrics()
        assert m["pdserve_kv_bytes_transferred_total"] > 0
        blocks_back(s, p, d)


@pytest.mark.parametrize("mode", ["read", "write"])
def test_fp8_kv_cache_pair_equals_standalone_fp8(module_tmp, mode):
    """--kv-cache-dtype fp8 on every instance: the pair's output is a standalone fp8 instance's; the
    instances report their float8 KV (startup log, /kv_info)."""
    fp8 = ("--kv-cache-dtype", "fp8", "--max-num-batched-tokens", "32")
    with ExitStack() as st:
        s = st.enter_context(pdserve_server(module_tmp, *fp8))
        p = st.enter_context(pdserve_server(module_tmp, "--role", "prefill", "--kv-mode", mode, *fp8))
        d = st.enter_context(pdserve_server(module_tmp, "--role", "decode", "--kv-mode", mode, *fp8))
        for prompt in PROMPTS:
            ref = complete(s.base_url, prompt)["choices"][0]
            got = disagg(p, d, prompt, mode)["choices"][0]
            assert got["text"] == ref["text"] and got["finish_reason"] == "length"
        info = httpx.get(f"{d.base_url}/kv_info").json()
        assert info["kv_cache_dtype"] == "fp8" and info["kv_dtype"] == "float8_e4m3fn"
        assert "KV cache dtype fp8: float8_e4m3fn" in s.log()
        blocks_back(s, p, d)


def test_many_requests_with_aborts_and_a_killed_prefill(module_tmp):
    """200 requests, random client aborts; then the prefill is killed: nothing leaks on decode."""
    flags = ("--kv-transfer-timeout", "3", "--kv-lease-seconds", "5")
    with ExitStack() as st:
        p = st.enter_context(pdserve_server(module_tmp, "--role", "prefill", *flags))
        d = st.enter_context(pdserve_server(module_tmp, "--role", "decode", *flags))
        rng = random.Random(0)

        def one(i: int) -> None:
            prompt = [rng.randrange(250) for _ in range(rng.randint(2, 120))]
            timeout = 0.05 if rng.random() < 0.25 else 60  # a client that gives up early
            try:
                rid = uuid.uuid4().hex
                pr = httpx.post(f"{p.base_url}/v1/completions", headers={"X-Request-Id": rid}, timeout=timeout,
                                json={**BODY, "prompt": prompt, "max_tokens": 1,
                                      "kv_transfer_params": {"do_remote_decode": True}}).json()
                httpx.post(f"{d.base_url}/v1/completions", headers={"X-Request-Id": rid}, timeout=timeout,
                           json={**BODY, "prompt": prompt, "max_tokens": rng.randint(1, 16),
                                 "kv_transfer_params": pr["kv_transfer_params"]})
            except httpx.TimeoutException:
                pass

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(200)))
        blocks_back(p, d)
        # Prefill answers, then dies before decode reads: decode fails the request, frees its blocks.
        pr = complete(p.base_url, PROMPTS[2], {"max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
        p.stop(signal.SIGKILL)
        r = httpx.post(f"{d.base_url}/v1/completions", timeout=60,
                       json={**BODY, "prompt": PROMPTS[2], "kv_transfer_params": pr["kv_transfer_params"]})
        assert r.status_code >= 500 or r.json()["choices"][0]["finish_reason"] == "error", r.text
        assert "KV" in r.text
        blocks_back(d)


def test_instances_refuse_what_needs_the_prompt_computed_here(module_tmp):
    """Echo with logprobs or prompt_logprobs cannot use remote KV (prompt logprobs come from computing
    the prompt), and a prefill half computes one choice (n > 1 there is a client's mistake): a 400
    naming the field, before anything is transferred."""
    remote = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_handshake_port": 1,
              "remote_notify_port": 2, "remote_block_ids": [0, 1]}
    with pdserve_server(module_tmp, "--role", "decode") as d:
        r = httpx.post(f"{d.base_url}/v1/completions", timeout=30,
                       json={**BODY, "prompt": PROMPTS[1], "kv_transfer_params": remote, "echo": True, "logprobs": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text
        for path, body in (("completions", {"prompt": PROMPTS[1]}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "hello"}]})):
            r = httpx.post(f"{d.base_url}/v1/{path}", timeout=30,
                           json={**BODY, **body, "kv_transfer_params": remote, "prompt_logprobs": 0})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
        blocks_back(d)
    with pdserve_server(module_tmp, "--role", "prefill") as p:
        r = httpx.post(f"{p.base_url}/v1/completions", timeout=30,
                       json={**BODY, "prompt": PROMPTS[1], "kv_transfer_params": {"do_remote_decode": True}, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        blocks_back(p)


def test_prompt_length_mismatch_with_the_prefill_is_400(module_tmp):
    """kv_transfer_params naming another prompt length than the decode's rendering of the prompt
    (another tokenizer or chat template on the prefill): a 400 naming the field, before any transfer."""
    remote = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_handshake_port": 1,
              "remote_notify_port": 2, "remote_block_ids": [0, 1], "num_prompt_tokens": 3}
    with pdserve_server(module_tmp, "--role", "decode") as d:
        r = httpx.post(f"{d.base_url}/v1/completions", timeout=30,
                       json={**BODY, "prompt": PROMPTS[1], "kv_transfer_params": remote})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params", r.text
        assert "tokens here but 3 on the prefill" in r.json()["error"]["message"]
        blocks_back(d)
