"""Disaggregated orchestration (READ serial, WRITE concurrent) against fake prefill/decode
instances, in process: the bodies of both halves, retries, fallbacks, aborts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq

from pdserve.kv.messages import PROXY_ENGINE_ID, Abort, Register, encode
from pdserve.proxy import bodies
from pdserve.proxy.instances import Instance
from pdserve.proxy.settings import ProxySettings
from tests.unit.test_proxy_fakes import FakeInstance, KVBus, RunningProxy, post, running_proxy, sse_events, until

BODY = {
    "model": "fake",
    "prompt": "hi",
    "max_tokens": 4,
    "min_tokens": 4,
    "stream": True,
    "stream_options": {"include_usage": True},
}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}
Session = aiohttp.ClientSession
Fakes = list[FakeInstance]
Body = Callable[[RunningProxy, Session, Fakes, Fakes], Awaitable[None]]


def _disagg(p: list[str], d: list[str], **kw: Any) -> ProxySettings:
    return ProxySettings(prefill=tuple(p), decode=tuple(d), registry_port=None, health_interval_s=0.1, **kw)


def _run(prefills: list[FakeInstance], decodes: list[FakeInstance], body: Body, **kw: Any) -> None:
    async def main() -> None:
        for f in prefills + decodes:
            await f.start()
        try:
            settings = _disagg([f.url for f in prefills], [f.url for f in decodes], **kw)
            async with running_proxy(settings) as proxy, aiohttp.ClientSession() as s:
                await body(proxy, s, prefills, decodes)
        finally:
            for f in prefills + decodes:
                await f.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


def _texts(raw: bytes) -> list[str]:
    return [msgspec.json.decode(e)["choices"][0]["text"] for e in sse_events(raw) if e != b"[DONE]"]


# -- bodies -----------------------------------------------------------------------------------


def test_prefill_body_read() -> None:
    half = msgspec.json.decode(bodies.prefill_body(BODY, "/v1/completions", bodies.prefill_params("READ")))
    assert half == {
        "model": "fake",
        "prompt": "hi",
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "transfer_mode": "READ"},
    }
    chat = msgspec.json.decode(bodies.prefill_body(CHAT, "/v1/chat/completions", bodies.prefill_params("READ")))
    assert chat["max_completion_tokens"] == 1 and chat["max_tokens"] == 1


def test_write_params_carry_the_peer() -> None:
    d = Instance("127.0.0.1:9002", "D", False, engine_id="dec", kv_host="10.0.0.2", handshake_port=5, notify_port=6)
    p = Instance("127.0.0.1:9001", "P", False, engine_id="pre", kv_host="10.0.0.1", handshake_port=7, notify_port=8)
    assert bodies.params_json(bodies.prefill_params("WRITE", d)) == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "transfer_mode": "WRITE",
        "remote_engine_id": "dec",
        "remote_host": "10.0.0.2",
        "remote_handshake_port": 5,
        "remote_notify_port": 6,
    }
    half = msgspec.json.decode(bodies.decode_body(BODY, bodies.write_decode_params(p)))
    assert half["kv_transfer_params"] == {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "transfer_mode": "WRITE",
        "remote_engine_id": "pre",
        "remote_host": "10.0.0.1",
        "remote_port": 9001,
        "remote_handshake_port": 7,
        "remote_notify_port": 8,
    }
    assert {k: v for k, v in half.items() if k != "kv_transfer_params"} == BODY


def test_params_from_prefill() -> None:
    good = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [1], "vendor_extra": 1}
    assert bodies.params_from_prefill(msgspec.json.encode({"kv_transfer_params": good})) == good
    assert bodies.params_from_prefill(b'{"kv_transfer_params": null}') is None
    # vLLM 0.32's NixlConnector answer: block ids per KV-cache group, its own transfer_mode names
    vllm = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[3, 4, 5]],
            "remote_engine_id": "e", "remote_request_id": "cmpl-1", "remote_host": "127.0.0.1", "remote_port": 5600,
            "tp_size": 1, "remote_num_tokens": 112, "transfer_mode": "pull"}
    assert bodies.params_from_prefill(msgspec.json.encode({"kv_transfer_params": vllm})) == vllm
    for bad in (
        b"nope",
        b"[]",
        b'{"kv_transfer_params": 3}',
        b'{"kv_transfer_params": {"remote_block_ids": "x"}}',
        b'{"kv_transfer_params": {"do_remote_prefill": true, "remote_block_ids": [["x"]]}}',
        b'{"kv_transfer_params": {"do_remote_prefill": true, "remote_port": "p"}}',
        b'{"kv_transfer_params": {"do_remote_prefill": false}}',
    ):
        try:
            bodies.params_from_prefill(bad)
        except bodies.BadParams:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_json_nested_too_deeply_is_a_bad_body_or_bad_params() -> None:
    """msgspec raises RecursionError (not DecodeError) past its depth limit: a client's body is a
    BadBody (the proxy's 400) and a prefill's answer BadParams (a failed half), not a 500."""
    deep = b"[" * 5000 + b"]" * 5000
    with pytest.raises(bodies.BadBody):
        bodies.parse_body(b'{"prompt": ' + deep + b"}")
    with pytest.raises(bodies.BadParams):
        bodies.params_from_prefill(b'{"kv_transfer_params": {"do_remote_prefill": true, "x": ' + deep + b"}}")


# -- READ -------------------------------------------------------------------------------------


def test_read_mode_serial_halves() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        status, raw, rid = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and _texts(raw) == ["w0", "w1", "w2", "w3"]
        (pre,), (dec,) = ps[0].seen, ds[0].seen
        assert pre.request_id == dec.request_id == rid
        assert pre.body["max_tokens"] == 1 and pre.body["stream"] is False
        assert "stream_options" not in pre.body and "min_tokens" not in pre.body
        assert pre.body["kv_transfer_params"] == {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "transfer_mode": "READ",
        }
        assert dec.body == {**BODY, "kv_transfer_params": ps[0].params(rid)}  # forwarded as the prefill sent them
        status, raw, _ = await post(s, proxy.url + "/v1/chat/completions", CHAT)
        assert status == 200 and ps[0].seen[1].body["max_completion_tokens"] == 1
        assert ds[0].seen[1].body["max_completion_tokens"] == 4

    _run([FakeInstance("P")], [FakeInstance("D")], body)


def test_read_prefill_retry_then_fallback() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        min(ps, key=lambda f: f"127.0.0.1:{f.port}").behavior = "500"  # round-robin's first pick fails
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and _texts(raw) == ["w0", "w1", "w2", "w3"]
        assert [len(p.seen) for p in ps] == [1, 1]  # the retry went to the other prefill
        ps[0].behavior = ps[1].behavior = "500"
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and _texts(raw) == ["w0", "w1", "w2", "w3"]
        assert "kv_transfer_params" not in ds[0].seen[-1].body  # local prefill: the plain request
        assert ds[0].seen[-1].body == BODY
        # an id of its own: a both instance whose prefill half failed may still hold the client's
        assert ds[0].seen[-1].request_id == ps[0].seen[-1].request_id + "-local"
        metrics = await (await s.get(proxy.url + "/metrics")).text()
        assert 'pdserve_proxy_fallbacks_total{reason="prefill_failed"} 1' in metrics
        assert 'pdserve_proxy_retries_total{role="prefill"} 2' in metrics

    _run([FakeInstance("P"), FakeInstance("P")], [FakeInstance("D")], body)


def test_read_fallback_fail_is_503() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 503 and msgspec.json.decode(raw)["error"]["code"] == "prefill_failed"
        assert ds[0].seen == []

    _run([FakeInstance("P", behavior="500")], [FakeInstance("D")], body, fallback="fail")


def test_read_prefill_timeout_is_a_failure() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and "kv_transfer_params" not in ds[0].seen[0].body
        await until(lambda: ps[0].cancelled == 1)  # the hung prefill half was closed

    _run([FakeInstance("P", behavior="hang")], [FakeInstance("D")], body, prefill_timeout_s=0.3)


def test_read_without_prefill_instances() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        assert (await s.get(proxy.url + "/health")).status == 503  # no prefill: degraded
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and ds[0].seen[0].body == BODY
        metrics = await (await s.get(proxy.url + "/metrics")).text()
        assert 'pdserve_proxy_fallbacks_total{reason="no_prefill"} 1' in metrics

    _run([], [FakeInstance("D")], body)


def test_read_no_decode_is_503() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 503 and "decode" in msgspec.json.decode(raw)["error"]["message"]
        assert ps[0].seen == []  # no prefill work for nothing

    _run([FakeInstance("P")], [], body)


def test_read_prefill_4xx_passes_through() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 400 and msgspec.json.decode(raw)["error"]["param"] == "max_tokens"
        assert sum(len(p.seen) for p in ps) == 1 and ds[0].seen == []  # no retry

    _run([FakeInstance("P", behavior="400"), FakeInstance("P", behavior="400")], [FakeInstance("D")], body)


def test_read_no_params_means_local_prefill() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        status, _, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and ds[0].seen[0].body == BODY and len(ps[0].seen) == 1

    _run([FakeInstance("P", behavior="no_params")], [FakeInstance("D")], body, fallback="fail")


def test_read_priority_and_return_token_ids_reach_both_halves() -> None:
    """vLLM's `priority` orders the request on both instances; `return_token_ids` rides along."""

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        extra = {"priority": -2, "return_token_ids": True}
        for path, req in (("/v1/completions", BODY), ("/v1/chat/completions", CHAT)):
            status, _, _ = await post(s, proxy.url + path, {**req, **extra})
            assert status == 200
        assert len(ps[0].seen) == len(ds[0].seen) == 2
        for half in ps[0].seen + ds[0].seen:
            assert {k: half.body[k] for k in extra} == extra

    _run([FakeInstance("P")], [FakeInstance("D")], body)


def test_prompt_logprobs_are_served_by_a_decode_alone() -> None:
    """Like echo: the prompt's logprobs are computed where the prompt is, so no prefill half."""

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        for path, req in (("/v1/completions", BODY), ("/v1/chat/completions", CHAT)):
            status, _, _ = await post(s, proxy.url + path, {**req, "prompt_logprobs": 0})
            assert status == 200
        assert not ps[0].seen and [x.body for x in ds[0].seen] == [
            {**BODY, "prompt_logprobs": 0},
            {**CHAT, "prompt_logprobs": 0},
        ]
        status, _, _ = await post(s, proxy.url + "/v1/completions", {**BODY, "prompt_logprobs": None})
        assert status == 200 and len(ps[0].seen) == 1  # null: not asked, disaggregated as usual

    _run([FakeInstance("P")], [FakeInstance("D")], body)


def test_one_token_requests_go_whole_to_a_prefill() -> None:
    """At most one output token is prefill-only work (a classifier, an echo loglikelihood): the body
    as is to a prefill instance, nothing to the decode; a decode takes it when no prefill is up."""
    one = [("/v1/completions", {**BODY, "max_tokens": 1, "min_tokens": 0, "echo": True}),
           ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 1}),
           ("/v1/chat/completions", {**CHAT, "max_completion_tokens": None, "max_tokens": 1})]

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        for path, req in one:
            status, _, _ = await post(s, proxy.url + path, req)
            assert status == 200
        assert not ds[0].seen and [x.body for x in ps[0].seen] == [req for _, req in one]
        metrics = await (await s.get(proxy.url + "/metrics")).text()
        assert 'pdserve_proxy_prefill_only_total{reason="one_token"} 3' in metrics
        # max_completion_tokens wins over max_tokens, as in vLLM: two tokens are disaggregated
        status, _, _ = await post(s, proxy.url + "/v1/chat/completions", {**CHAT, "max_completion_tokens": 2,
                                                                          "max_tokens": 1})
        assert status == 200 and len(ps[0].seen) == 4 and len(ds[0].seen) == 1
        assert ps[0].seen[3].body["kv_transfer_params"]["do_remote_decode"] is True

    _run([FakeInstance("P")], [FakeInstance("D")], body)

    async def no_prefill(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        status, _, _ = await post(s, proxy.url + one[1][0], one[1][1])
        assert status == 200 and ds[0].seen[0].body == one[1][1]

    _run([], [FakeInstance("D")], no_prefill)


def test_beam_search_is_served_by_a_decode_alone() -> None:
    """vLLM's use_beam_search sends every beam as a prompt of its own each step: the whole request goes
    to a decode (fallback "beam_search"); false is disaggregated as usual."""

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        for path, req in (("/v1/completions", BODY), ("/v1/chat/completions", CHAT)):
            status, _, _ = await post(s, proxy.url + path, {**req, "use_beam_search": True, "n": 2})
            assert status == 200
        assert not ps[0].seen and [x.body for x in ds[0].seen] == [
            {**BODY, "use_beam_search": True, "n": 2},
            {**CHAT, "use_beam_search": True, "n": 2},
        ]
        metrics = await (await s.get(proxy.url + "/metrics")).text()
        assert 'pdserve_proxy_fallbacks_total{reason="beam_search"} 2' in metrics
        status, _, _ = await post(s, proxy.url + "/v1/completions", {**BODY, "use_beam_search": False})
        assert status == 200 and len(ps[0].seen) == 1

    _run([FakeInstance("P")], [FakeInstance("D")], body)


def test_truncate_prompt_tokens_k_reaches_both_halves_and_minus_one_goes_to_a_decode_alone() -> None:
    """vLLM's truncate_prompt_tokens: a positive k keeps the same last k tokens in both halves; -1
    depends on max_tokens, which the prefill half sets to 1, so the decode prefills such a prompt itself."""

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        for path, req in (("/v1/completions", BODY), ("/v1/chat/completions", CHAT)):
            status, _, _ = await post(s, proxy.url + path, {**req, "truncate_prompt_tokens": 3})
            assert status == 200
        assert len(ps[0].seen) == len(ds[0].seen) == 2
        assert all(half.body["truncate_prompt_tokens"] == 3 for half in ps[0].seen + ds[0].seen)
        for path, req in (("/v1/completions", BODY), ("/v1/chat/completions", CHAT)):
            status, _, _ = await post(s, proxy.url + path, {**req, "truncate_prompt_tokens": -1})
            assert status == 200
        assert len(ps[0].seen) == 2 and [x.body for x in ds[0].seen[2:]] == [
            {**BODY, "truncate_prompt_tokens": -1},
            {**CHAT, "truncate_prompt_tokens": -1},
        ]
        metrics = await (await s.get(proxy.url + "/metrics")).text()
        assert 'pdserve_proxy_fallbacks_total{reason="truncate_prompt_tokens"} 2' in metrics

    _run([FakeInstance("P")], [FakeInstance("D")], body)


def test_read_decode_retry_keeps_params_and_id() -> None:
    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        ds[1].behavior = "ok"
        for _ in range(2):
            status, raw, rid = await post(s, proxy.url + "/v1/completions", BODY)
            assert status == 200 and _texts(raw) == ["w0", "w1", "w2", "w3"]
        seen = [x for d in ds for x in d.seen if x.request_id == rid]
        assert len(seen) in (1, 2) and all(x.body["kv_transfer_params"] == ps[0].params(rid) for x in seen)
        assert len(ps[0].seen) == 2  # the prefill ran once per request
        ds[1].behavior = "500"
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 502 and msgspec.json.decode(raw)["error"]["code"] == "upstream_error"

    _run([FakeInstance("P")], [FakeInstance("D", behavior="500"), FakeInstance("D", behavior="500")], body)


# -- WRITE ------------------------------------------------------------------------------------


def test_write_mode_concurrent_halves() -> None:
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        status, raw, rid = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and _texts(raw) == ["w0", "w1", "w2", "w3"]
        (pre,), (dec,) = ps[0].seen, ds[0].seen
        assert pre.request_id == dec.request_id == rid
        assert pre.body["kv_transfer_params"] == {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "transfer_mode": "WRITE",
            "remote_engine_id": ds[0].engine_id,
            "remote_host": "127.0.0.1",
            "remote_handshake_port": ds[0].port + 1,
            "remote_notify_port": ds[0].port + 2,
        }
        assert dec.body["kv_transfer_params"] == {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_mode": "WRITE",
            "remote_engine_id": ps[0].engine_id,
            "remote_host": "127.0.0.1",
            "remote_port": ps[0].port,
            "remote_handshake_port": ps[0].port + 1,
            "remote_notify_port": ps[0].port + 2,
        }
        status, raw, _ = await post(s, proxy.url + "/v1/completions", {**BODY, "stream": False})
        assert status == 200 and msgspec.json.decode(raw)["choices"][0]["text"] == "w0 w1 w2 w3"

    _run([FakeInstance("P", bus, delay_s=0.05)], [FakeInstance("D", bus)], body, kv_mode="WRITE")


def test_write_prefill_failure_aborts_decode_then_retries() -> None:
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        bad = next(p for p in ps if p.behavior == "500")
        good = next(p for p in ps if p.behavior == "ok")
        for _ in range(2):  # whichever prefill goes first, both requests succeed
            status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
            assert status == 200 and _texts(raw) == ["w0", "w1", "w2", "w3"]
        assert len(bad.seen) >= 1 and len(good.seen) == 2
        await until(lambda: ds[0].cancelled == len(bad.seen))  # the decode halves paired with the failed prefill
        rids = [x.request_id for x in ds[0].seen]
        assert len(rids) == 2 + len(bad.seen) and len(set(rids)) == len(rids)  # a retried pair: a fresh id
        assert all(i.in_flight == 0 for i in proxy.state.table.all())

    _run(
        [FakeInstance("P", bus, behavior="500"), FakeInstance("P", bus)],
        [FakeInstance("D", bus)],
        body,
        kv_mode="WRITE",
    )


def test_write_commits_only_after_the_prefill_answered() -> None:
    """A decode half that streams a first chunk before it has the KV (chat's role chunk) is not
    committed yet: a prefill failure after that chunk is still retried cleanly."""
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        min(ps, key=lambda f: f"127.0.0.1:{f.port}").behavior = "500"  # round-robin's first pick fails
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and b"error" not in raw
        assert _texts(raw) == ["", "w0", "w1", "w2", "w3"]  # the early chunk of the retried pair only
        assert len(ds[0].seen) == 2
        await until(lambda: ds[0].cancelled == 1)

    prefills = [FakeInstance("P", bus, delay_s=0.1), FakeInstance("P", bus, delay_s=0.1)]
    _run(prefills, [FakeInstance("D", bus, early_chunk=True)], body, kv_mode="WRITE")


def test_write_all_prefills_fail_falls_back() -> None:
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        status, raw, rid = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and _texts(raw) == ["w0", "w1", "w2", "w3"]
        assert ds[0].seen[-1].body == BODY and ds[0].seen[-1].request_id == f"{rid}-local"

    _run([FakeInstance("P", bus, behavior="500")], [FakeInstance("D", bus)], body, kv_mode="WRITE")


def test_write_prefill_4xx_passes_through() -> None:
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 400
        await until(lambda: ds[0].cancelled == 1)

    _run([FakeInstance("P", bus, behavior="400")], [FakeInstance("D", bus)], body, kv_mode="WRITE")


BACKGROUND = {"model": "fake", "input": "hi", "max_output_tokens": 4, "background": True}


def test_write_background_response_commits_after_the_prefill_answered() -> None:
    """A background decode half answers at once; the proxy answers the client only once the prefill
    half has too (past the grace second a complete answer gets: the decode still needs the KV), and
    the prefill half is neither cut off nor sent `background`."""
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        start = asyncio.get_running_loop().time()
        status, raw, rid = await post(s, proxy.url + "/v1/responses", BACKGROUND)
        assert status == 200 and msgspec.json.decode(raw)["id"] == f"resp_{rid}"
        assert asyncio.get_running_loop().time() - start >= 1.3
        assert ps[0].cancelled == 0 and "background" not in ps[0].seen[0].body
        assert ds[0].seen[0].body["background"] is True and not ds[0].deleted

    _run([FakeInstance("P", bus, delay_s=1.3)], [FakeInstance("D", bus)], body, kv_mode="WRITE")


def test_write_background_response_of_a_failed_pair_is_deleted() -> None:
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        min(ps, key=lambda f: f"127.0.0.1:{f.port}").behavior = "500"  # round-robin's first pick fails
        status, raw, rid = await post(s, proxy.url + "/v1/responses", BACKGROUND)
        assert status == 200 and msgspec.json.decode(raw)["id"] == f"resp_{rid}-1"  # the retried pair's
        await until(lambda: ds[0].deleted == [f"resp_{rid}"])

    prefills = [FakeInstance("P", bus, delay_s=0.1), FakeInstance("P", bus, delay_s=0.1)]
    _run(prefills, [FakeInstance("D", bus)], body, kv_mode="WRITE")


def test_write_background_decode_answering_after_its_prefill_failed_is_deleted() -> None:
    """The prefill half fails before the background decode half has answered: the proxy still takes
    that answer (closing the connection would leave the response waiting for KV that never comes,
    until its transfer timeout) and deletes the response, then falls back."""
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        status, raw, rid = await post(s, proxy.url + "/v1/responses", BACKGROUND)
        assert status == 200 and msgspec.json.decode(raw)["id"] == f"resp_{rid}-local"
        await until(lambda: ds[0].deleted == [f"resp_{rid}"])
        assert ds[0].cancelled == 0

    _run([FakeInstance("P", bus, behavior="500")], [FakeInstance("D", bus, delay_s=0.3)], body, kv_mode="WRITE")


def _aborts(f: FakeInstance) -> list[str]:
    """Request ids of the proxy's notify `Abort`s that reached `f`."""
    msgs = f.notify_messages()
    assert all(isinstance(m, Abort) and m.engine_id == PROXY_ENGINE_ID for m in msgs), msgs
    return [m.request_id for m in msgs]


def test_write_prefill_half_given_up_on_is_told_to_free_its_blocks() -> None:
    """A WRITE pair abandoned before it was committed: unless the prefill half failed by itself (it then
    holds nothing), the proxy sends it the notify `Abort`, so that a prefill that already answered (or
    computes the request later) does not keep its KV blocks for the lease."""
    bus = KVBus("WRITE")

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        (p,), (d,) = ps, ds
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        d.behavior = "400"  # a body only the decode half refuses
        status, _, rid = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 400
        await until(lambda: _aborts(p) == [rid])
        assert "HTTP 400" in (p.notified[-1].reason or "")
        d.behavior = "500"  # the decode half fails (no other decode: 502)
        status, _, rid = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 502
        await until(lambda: _aborts(p)[-1:] == [rid])
        d.behavior, p.delay_s = "ok", 0.15  # the client goes away while the pair waits for the prefill
        with contextlib.suppress(asyncio.TimeoutError):
            await post(s, proxy.url + "/v1/completions", BODY, timeout=0.05)
        await until(lambda: len(p.seen) == 3 and _aborts(p)[-1:] == [p.seen[-1].request_id])
        p.delay_s = 0.0
        p.behavior = "500"  # the prefill half fails by itself: retried (here: local prefill), not told
        status, _, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200 and len(p.seen) == 4
        p.behavior = "hang"  # it times out: it may still compute the request later, so it is told
        status, _, _ = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200
        await until(lambda: _aborts(p)[-1:] == [p.seen[-1].request_id])
        assert len(_aborts(p)) == 4 and p.seen[3].request_id not in _aborts(p)
        assert all(i.in_flight == 0 for i in proxy.state.table.all())

    _run([FakeInstance("P", bus, notify=True)], [FakeInstance("D", bus)], body, kv_mode="WRITE", prefill_timeout_s=0.3)


def test_read_prefill_given_up_on_is_told_to_free_its_blocks() -> None:
    """READ: a prefill half that timed out, and one whose KV no decode attempt could take, are told too."""

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        (p,), (d,) = ps, ds
        await until(lambda: all(i.healthy and i.kv_ready for i in proxy.state.table.all()))
        p.behavior = "hang"
        status, _, first = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 200  # local prefill on the decode instance
        await until(lambda: _aborts(p) == [first])
        p.behavior, d.behavior = "ok", "500"
        status, _, second = await post(s, proxy.url + "/v1/completions", BODY)
        assert status == 502
        await until(lambda: _aborts(p) == [first, second])

    _run([FakeInstance("P", notify=True)], [FakeInstance("D")], body, prefill_timeout_s=0.3)


def test_write_mode_refuses_static_instances_of_another_mode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def body(proxy: RunningProxy, s: Session, ps: Fakes, ds: Fakes) -> None:
        await asyncio.sleep(0.3)
        assert not any(i.healthy for i in proxy.state.table.all())
        assert (await s.get(proxy.url + "/health")).status == 503
        assert (await post(s, proxy.url + "/v1/completions", BODY))[0] == 503

    _run([FakeInstance("P")], [FakeInstance("D")], body, kv_mode="WRITE")  # their /kv_info says READ
    assert "transfer_mode READ differs from the proxy's --kv-mode WRITE" in caplog.text


def test_write_mode_with_registered_instances_and_eviction() -> None:
    """Instances registered over ZMQ; a decode whose heartbeats stop mid-stream is evicted and the
    client gets the error event (no hang), later requests go to the other decode instance."""
    bus = KVBus("WRITE")

    async def main() -> None:
        p, d1, d2 = FakeInstance("P", bus), FakeInstance("D", bus, tokens=200, delay_s=0.02), FakeInstance("D", bus)
        for f in (p, d1, d2):
            await f.start()
        settings = ProxySettings(kv_mode="WRITE", registry_port=0, heartbeat_timeout_s=0.5)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            async with running_proxy(settings) as proxy, aiohttp.ClientSession() as s:
                assert proxy.state.registry is not None
                dealer.connect(f"tcp://127.0.0.1:{proxy.state.registry.port}")

                def beat(*fakes: FakeInstance) -> None:
                    for f in fakes:
                        dealer.send(
                            encode(
                                Register(
                                    role=f.role,
                                    request_address=f"127.0.0.1:{f.port}",
                                    handshake_port=f.port + 1,  # type: ignore[arg-type]
                                    notify_port=f.port + 2,
                                    transfer_mode="WRITE",
                                    engine_id=f.engine_id,
                                )
                            )
                        )

                beat(p, d1)
                await until(lambda: len(proxy.state.table.candidates("D")) == 1)
                assert (await s.get(proxy.url + "/health")).status == 200
                async with s.post(proxy.url + "/v1/completions", json=BODY) as r:
                    first = await r.content.readany()
                    assert first.startswith(b"data: ")
                    t0 = asyncio.get_running_loop().time()
                    rest = first
                    while chunk := await r.content.readany():  # d1 keeps streaming, its heartbeats stop
                        rest += chunk
                    waited = asyncio.get_running_loop().time() - t0
                events = sse_events(rest)
                assert events[-1] == b"[DONE]" and b"lost" in events[-2] and waited < 2.0
                beat(p, d2)
                table = proxy.state.table
                await until(lambda: bool(table.candidates("P") and table.candidates("D", {f"127.0.0.1:{d1.port}"})))
                status, raw, _ = await post(s, proxy.url + "/v1/completions", BODY)
                assert status == 200 and _texts(raw) == ["w0", "w1", "w2", "w3"] and len(d2.seen) == 1
        finally:
            dealer.close()
            ctx.term()
            for f in (p, d1, d2):
                await f.stop()

    asyncio.run(asyncio.wait_for(main(), 20))
