"""The proxy in standard mode against fake instances, in process: routing, pass-through, retries,
failures mid-stream, client disconnects, admin routes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec
import pytest

from pdserve.proxy.relay import split_events
from pdserve.proxy.settings import ProxySettings
from tests.unit.test_proxy_fakes import (
    FakeInstance,
    RunningProxy,
    free_port,
    post,
    running_proxy,
    sse_events,
    until,
)

COMPLETION = {"model": "fake", "prompt": "hello", "max_tokens": 4}


def _standard(*urls: str, **kw: object) -> ProxySettings:
    kw = {"health_interval_s": 0.1, **kw}
    return ProxySettings(mode="standard", instances=urls, registry_port=None, **kw)  # type: ignore[arg-type]


def _run(
    fakes: list[FakeInstance], settings_of: Callable[[list[str]], ProxySettings],
    body: Callable[[RunningProxy, aiohttp.ClientSession, list[FakeInstance]], Awaitable[None]],
) -> None:
    async def main() -> None:
        for f in fakes:
            await f.start()
        try:
            async with running_proxy(settings_of([f.url for f in fakes])) as proxy, aiohttp.ClientSession() as s:
                await body(proxy, s, fakes)
        finally:
            for f in fakes:
                await f.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_split_events() -> None:
    assert split_events(b"data: a\n\ndata: b\n\n") == (b"data: a\n\ndata: b\n\n", b"")
    assert split_events(b"data: a\n\ndata: b") == (b"data: a\n\n", b"data: b")
    assert split_events(b"data: par") == (b"", b"data: par")
    assert split_events(b"data: a\r\n\r\ndata") == (b"data: a\r\n\r\n", b"data")


def test_round_robin_streaming_and_not() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        url = proxy.url + "/v1/completions"
        status, raw, rid = await post(s, url, COMPLETION)
        assert status == 200 and msgspec.json.decode(raw)["choices"][0]["text"] == "w0 w1 w2 w3"
        status, raw, rid2 = await post(s, url, {**COMPLETION, "stream": True})
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
        events = sse_events(raw)
        assert [msgspec.json.decode(e)["choices"][0]["text"] for e in events[:-1]] == ["w0", "w1", "w2", "w3"]
        for _ in range(2):
            await post(s, proxy.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert [len(f.seen) for f in fakes] == [2, 2]
        assert rid and rid2 and rid != rid2
        assert {x.request_id for f in fakes for x in f.seen} >= {rid, rid2}
        first = next(f for f in fakes if f.seen[0].request_id == rid)
        assert first.seen[0].body == COMPLETION  # forwarded untouched
        assert [x.path for x in first.seen] == ["/v1/completions", "/v1/chat/completions"]
        assert all(i.in_flight == 0 for i in proxy.state.table.all())

    _run([FakeInstance("S"), FakeInstance("S")], lambda urls: _standard(*urls), body)


def test_least_loaded_routing() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        slow = asyncio.ensure_future(post(s, proxy.url + "/v1/completions", {**COMPLETION, "stream": True}))
        await until(lambda: sum(len(f.seen) for f in fakes) == 1)
        busy = next(f for f in fakes if f.seen)
        for _ in range(3):  # the busy one keeps its stream: the others go to the idle one
            await post(s, proxy.url + "/v1/completions", COMPLETION)
        assert len(busy.seen) == 1
        await slow

    fakes = [FakeInstance("S", delay_s=0.3), FakeInstance("S", delay_s=0.3)]
    _run(fakes, lambda urls: _standard(*urls, routing="least-loaded"), body)


def test_dead_instance_is_skipped_and_marked() -> None:
    dead_url = f"http://127.0.0.1:{free_port()}"

    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        table = proxy.state.table
        dead = table.get(dead_url.removeprefix("http://"))
        assert dead is not None and not dead.healthy  # the first health check failed
        dead.healthy = True  # as if it died after the check: the call fails, the retry succeeds
        for _ in range(4):
            status, _, _ = await post(s, proxy.url + "/v1/completions", COMPLETION)
            assert status == 200
        assert len(fakes[0].seen) == 4 and not dead.healthy
        metrics = await (await s.get(proxy.url + "/metrics")).text()
        assert 'pdserve_proxy_retries_total{role="standalone"} 1' in metrics
        assert 'pdserve_proxy_upstream_failures_total{role="standalone",kind="unreachable"} 1' in metrics
        assert f'pdserve_proxy_instance_healthy{{instance="{dead.address}",role="standalone"}} 0' in metrics

    _run([FakeInstance("S")], lambda urls: _standard(*urls, dead_url), body)


def test_4xx_passes_through_without_retry() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        status, raw, _ = await post(s, proxy.url + "/v1/completions", {**COMPLETION, "stream": True})
        assert status == 400
        assert msgspec.json.decode(raw)["error"]["param"] == "max_tokens"
        assert sum(len(f.seen) for f in fakes) == 1

    _run([FakeInstance("S", behavior="400"), FakeInstance("S", behavior="400")], lambda u: _standard(*u), body)


def test_5xx_is_retried_then_502() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        fakes[1].behavior = "ok"
        for _ in range(2):
            status, _, _ = await post(s, proxy.url + "/v1/completions", COMPLETION)
            assert status == 200
        fakes[1].behavior = "500"
        status, raw, _ = await post(s, proxy.url + "/v1/completions", COMPLETION)
        err = msgspec.json.decode(raw)["error"]
        assert status == 502 and err["code"] == "upstream_error" and "HTTP 500" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}

    _run([FakeInstance("S", behavior="500"), FakeInstance("S", behavior="500")], lambda u: _standard(*u), body)


def test_no_instance_is_503() -> None:
    async def main() -> None:
        async with running_proxy(_standard()) as proxy, aiohttp.ClientSession() as s:
            for path in ("/v1/completions", "/v1/chat/completions"):
                status, raw, _ = await post(s, proxy.url + path, COMPLETION)
                err = msgspec.json.decode(raw)["error"]
                assert status == 503 and err["code"] == "no_instance" and "standalone" in err["message"]
            r = await s.get(proxy.url + "/health")
            assert r.status == 503 and "no healthy standalone instance" in await r.text()
            assert (await s.get(proxy.url + "/v1/models")).status == 503

    asyncio.run(main())


def test_mid_stream_failure_sends_an_error_event() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        status, raw, _ = await post(s, proxy.url + "/v1/completions", {**COMPLETION, "stream": True})
        assert status == 200
        events = sse_events(raw)
        assert len(events) == 4 and events[-1] == b"[DONE]"  # w0, w1, the error, [DONE]; no partial event
        err = msgspec.json.decode(events[2])["error"]
        assert err["code"] == "upstream_error" and "stream broke" in err["message"]
        status, raw, _ = await post(s, proxy.url + "/v1/completions", COMPLETION)  # non-streaming: fine
        assert status == 200
        metrics = await (await s.get(proxy.url + "/metrics")).text()
        assert 'pdserve_proxy_requests_total{outcome="stream_error"} 1' in metrics

    _run([FakeInstance("S", behavior="drop")], lambda u: _standard(*u), body)


def test_a_broken_stream_probes_the_instance() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        inst = proxy.state.table.all()[0]
        await post(s, proxy.url + "/v1/completions", {**COMPLETION, "stream": True})
        await asyncio.sleep(0.2)
        assert inst.healthy  # the probe found it alive
        fakes[0].healthy = False
        await post(s, proxy.url + "/v1/completions", {**COMPLETION, "stream": True})
        await until(lambda: not inst.healthy, timeout=1.0)  # long before the next periodic check

    _run([FakeInstance("S", behavior="drop")], lambda u: _standard(*u, health_interval_s=60), body)


def test_client_disconnect_cancels_upstream() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        fake = fakes[0]
        async with s.post(proxy.url + "/v1/completions", json={**COMPLETION, "stream": True}) as r:
            await r.content.readany()  # the stream started
        await until(lambda: fake.cancelled == 1)
        fake.behavior = "hang"  # a client gone before any byte
        task = asyncio.ensure_future(post(s, proxy.url + "/v1/completions", COMPLETION))
        await until(lambda: len(fake.seen) == 2)
        task.cancel()
        await until(lambda: fake.cancelled == 2)
        await until(lambda: all(i.in_flight == 0 for i in proxy.state.table.all()))
        metrics = await (await s.get(proxy.url + "/metrics")).text()
        assert 'pdserve_proxy_requests_total{outcome="cancelled"} 2' in metrics

    _run([FakeInstance("S", tokens=50, delay_s=0.05)], lambda u: _standard(*u), body)


def test_api_keys_and_body_limit() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        url = proxy.url + "/v1/completions"
        status, raw, _ = await post(s, url, COMPLETION)
        assert status == 401 and msgspec.json.decode(raw)["error"]["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer client-key"}
        assert (await post(s, url, COMPLETION, good))[0] == 200
        assert fakes[0].seen[0].auth == "Bearer instance-key"
        assert (await post(s, url, {"prompt": "x" * 300}, good))[0] == 413
        assert (await s.get(proxy.url + "/v1/models")).status == 401
        r = await s.get(proxy.url + "/v1/models", headers=good)
        assert r.status == 200 and (await r.json())["data"][0]["id"] == "fake"

    _run([FakeInstance("S")], lambda u: _standard(*u, api_key="client-key", instance_api_key="instance-key",
                                                   max_body_bytes=200), body)


def test_client_authorization_is_forwarded_by_default() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        await post(s, proxy.url + "/v1/completions", COMPLETION, {"Authorization": "Bearer abc"})
        assert fakes[0].seen[0].auth == "Bearer abc"

    _run([FakeInstance("S")], lambda u: _standard(*u), body)


def test_admin_routes() -> None:
    async def body(proxy: RunningProxy, s: aiohttp.ClientSession, fakes: list[FakeInstance]) -> None:
        assert (await s.get(proxy.url + "/health")).status == 200
        rows = await (await s.get(proxy.url + "/instances")).json()
        assert [(r["role"], r["source"], r["healthy"], r["in_flight"]) for r in rows] == [
            ("standalone", "static", True, 0)]
        await fakes[0].stop()
        await until(lambda: not proxy.state.table.all()[0].healthy)  # the health check noticed
        assert (await s.get(proxy.url + "/health")).status == 503
        text = await (await s.get(proxy.url + "/metrics")).text()
        assert "# TYPE pdserve_proxy_request_overhead_seconds histogram" in text

    _run([FakeInstance("S")], lambda u: _standard(*u), body)


@pytest.mark.parametrize("argv", [["--mode", "standard", "--prefill", "http://h:1"], ["--instance", "h:1"]])
def test_settings_reject_inconsistent_topologies(argv: list[str]) -> None:
    import argparse

    from pdserve.proxy.command import add_parser, settings_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    with pytest.raises(ValueError):
        settings_from_args(parser.parse_args(["proxy", *argv]))
