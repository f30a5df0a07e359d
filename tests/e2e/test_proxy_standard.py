"""The proxy in standard mode in front of two real `pdserve serve` standalone instances (static
URLs), driven by the official `openai` client; then failures: no instance, an instance killed."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import TINY_MODEL, ServerProcess, free_port, launch, parse_metrics, pdserve_argv, pdserve_server

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0.0, "seed": 7}
FINISHED = 'pdserve_requests_total{finish_reason="length"}'


@contextlib.contextmanager
def proxy_process(tmp: Path, *args: str, health: str = "/health") -> Iterator[ServerProcess]:
    port = free_port()
    argv = pdserve_argv("proxy", "--port", str(port), "--registry-port", str(free_port()), "--log-level", "info",
                        "--health-interval", "0.2", *args)
    with launch(argv, port, tmp / f"proxy-{port}.log", health_path=health) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def instances(module_tmp: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with pdserve_server(module_tmp) as a, pdserve_server(module_tmp) as b:
        yield a, b


@pytest.fixture(scope="module")
def proxy(module_tmp: Path, instances: tuple[ServerProcess, ServerProcess]) -> Iterator[ServerProcess]:
    a, b = instances
    with proxy_process(module_tmp, "--mode", "standard", "--instance", a.base_url, b.base_url) as p:
        yield p
        assert p.stop() == 0  # SIGTERM: graceful exit 0


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0, timeout=60)


def _finished(server: ServerProcess) -> float:
    return server.metrics().get(FINISHED, 0.0)


def test_openai_client_through_the_proxy(proxy: ServerProcess, instances: tuple[ServerProcess, ...]) -> None:
    via, direct = _client(proxy), _client(instances[0])
    assert [m.id for m in via.models.list().data] == [TINY_MODEL]
    want = direct.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=12, **GREEDY).choices[0].text
    got = via.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=12, **GREEDY)
    assert got.choices[0].text == want and got.usage is not None and got.usage.completion_tokens == 12
    chunks = list(via.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=12, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    messages = [{"role": "user", "content": "hi"}]
    chat_want = direct.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8, **GREEDY)  # type: ignore[arg-type]
    chat = via.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8, **GREEDY)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == chat_want.choices[0].message.content
    stream = via.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8, stream=True, **GREEDY)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat_want.choices[0].message.content


def test_tokenize_through_the_proxy(proxy: ServerProcess, instances: tuple[ServerProcess, ...]) -> None:
    with httpx.Client(timeout=30) as http:
        for path, body in [("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [72, 105]}),
                           ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]})]:
            want = http.post(instances[0].base_url + path, json=body)
            got = http.post(proxy.base_url + path, json=body)
            assert got.status_code == want.status_code == 200 and got.json() == want.json(), got.text
        bad = http.post(proxy.base_url + "/detokenize", json={"tokens": [-1]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"  # the instance's answer
        too_big = http.post(proxy.base_url + "/tokenize", content=b"x" * (64 << 20),
                            headers={"content-type": "application/json"})
        assert too_big.status_code == 413
        paths = http.get(proxy.base_url + "/openapi.json").json()["paths"]
        assert "prompt" in str(paths["/tokenize"]["post"]["requestBody"])


def test_requests_spread_evenly(proxy: ServerProcess, instances: tuple[ServerProcess, ...]) -> None:
    before = [_finished(s) for s in instances]
    via = _client(proxy)
    for i in range(6):
        via.completions.create(model=TINY_MODEL, prompt=f"{PROMPT} {i}", max_tokens=4, stream=i % 2 == 1, **GREEDY)
    time.sleep(0.2)
    assert [_finished(s) - b for s, b in zip(instances, before, strict=True)] == [3.0, 3.0]
    rows = httpx.get(proxy.base_url + "/instances").json()
    assert [(r["role"], r["healthy"], r["in_flight"]) for r in rows] == [("standalone", True, 0)] * 2


def test_4xx_passes_through(proxy: ServerProcess, instances: tuple[ServerProcess, ...]) -> None:
    bad = {"model": TINY_MODEL, "prompt": PROMPT, "max_tokens": -1}
    direct = httpx.post(instances[0].v1_url + "/completions", json=bad)
    before = parse_metrics(httpx.get(proxy.base_url + "/metrics").text)
    via = httpx.post(proxy.v1_url + "/completions", json=bad)
    assert via.status_code == direct.status_code == 400
    assert via.json() == direct.json() and set(via.json()["error"]) == {"message", "type", "param", "code"}
    after = parse_metrics(httpx.get(proxy.base_url + "/metrics").text)
    assert after.get('pdserve_proxy_retries_total{role="standalone"}', 0) == before.get(
        'pdserve_proxy_retries_total{role="standalone"}', 0)
    with pytest.raises(openai.BadRequestError):
        _client(proxy).completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=-1)


def test_no_instance_is_503(module_tmp: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with proxy_process(module_tmp, "--mode", "standard", "--instance", dead, health="/metrics") as p:
        r = httpx.post(p.v1_url + "/completions", json={"model": TINY_MODEL, "prompt": PROMPT})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_instance" and "standalone" in r.json()["error"]["message"]
        assert httpx.get(p.base_url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError):
            _client(p).completions.create(model=TINY_MODEL, prompt=PROMPT)


def test_registered_instance_with_a_token(module_tmp: Path) -> None:
    """A standalone instance registering over ZMQ (role S, token checked) serves a standard proxy; once
    killed, it is evicted after the heartbeat timeout."""
    registry = free_port()
    with proxy_process(module_tmp, "--mode", "standard", "--registry-port", str(registry), "--registry-token", "tok",
                       "--heartbeat-timeout", "1", health="/metrics") as p:
        assert httpx.get(p.base_url + "/health").status_code == 503
        with pdserve_server(module_tmp, "--proxy-address", f"127.0.0.1:{registry}", "--registry-token", "tok") as inst:
            deadline = time.monotonic() + 10
            while httpx.get(p.base_url + "/health").status_code != 200:
                assert time.monotonic() < deadline, "the instance never registered"
                time.sleep(0.1)
            (row,) = httpx.get(p.base_url + "/instances").json()
            assert (row["role"], row["source"]) == ("standalone", "registered")
            assert row["address"] == f"127.0.0.1:{inst.port}"
            got = _client(p).completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=5, **GREEDY)
            assert got.choices[0].text
            inst.proc.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            while httpx.get(p.base_url + "/health").status_code == 200:
                assert time.monotonic() - t0 < 3, "not evicted"
                time.sleep(0.1)


def test_prefix_routing_keeps_a_shared_prefix_on_one_instance(
    module_tmp: Path, instances: tuple[ServerProcess, ServerProcess]
) -> None:
    """--routing prefix: chats sharing a system prompt all go where the first one went, so every
    later one finds the prompt in that instance's prefix cache (round-robin would alternate and
    compute it on both); a second system prompt goes to the other, idle, instance."""
    systems = [f"System prompt number {k}: be concise, be kind, and never guess. " * 3 for k in (1, 2)]
    before = [_finished(i) for i in instances]
    with proxy_process(module_tmp, "--mode", "standard", "--routing", "prefix", "--instance",
                       instances[0].base_url, instances[1].base_url) as p:
        via = _client(p)
        for system in systems:
            cached = []
            for q in ("one", "two", "three", "four"):
                messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {q}?"}]
                r = via.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=2, **GREEDY)  # type: ignore[arg-type]
                assert r.usage is not None and r.usage.prompt_tokens_details is not None
                cached.append(r.usage.prompt_tokens_details.cached_tokens)
            assert cached[0] == 0 and min(cached[1:]) >= len(system) // 16 * 16 - 16, cached
        r = httpx.post(p.base_url + "/reset_prefix_cache", timeout=10)  # fans out to both instances
        rows = r.json()["instances"]
        assert r.status_code == 200 and sorted(row["address"] for row in rows) == sorted(
            i.base_url.removeprefix("http://") for i in instances)
        assert all(row["forgotten_blocks"] > 0 for row in rows)
    assert [_finished(i) - b for i, b in zip(instances, before, strict=True)] == [4, 4]


def test_killed_instance_mid_stream(proxy: ServerProcess, instances: tuple[ServerProcess, ServerProcess]) -> None:
    """SIGKILL the instance serving a long stream: the client gets an error event and [DONE] (no hang),
    later requests all go to the survivor. Runs last: it kills one of the module's instances."""
    body = {"model": TINY_MODEL, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", proxy.v1_url + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        while len([x for x in lines if x.startswith("data: ")]) < 5:
            lines.append(next(it))
        rows = httpx.get(proxy.base_url + "/instances").json()
        busy = next(r["address"] for r in rows if r["in_flight"] == 1)
        victim = next(s for s in instances if s.base_url.endswith(busy))
        survivor = next(s for s in instances if s is not victim)
        victim.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        lines.extend(it)
        waited = time.monotonic() - t0
    events = [x.removeprefix("data: ") for x in lines if x.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"error"' in events[-2] and waited < 3.0
    assert all('"error"' not in e for e in events[:-2])
    before = _finished(survivor)
    via = _client(proxy)
    for _ in range(4):
        via.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=4, **GREEDY)
    assert _finished(survivor) - before == 4
    rows = {r["address"]: r for r in httpx.get(proxy.base_url + "/instances").json()}
    assert rows[busy]["healthy"] is False
    text = httpx.get(proxy.base_url + "/metrics").text
    assert parse_metrics(text)['pdserve_proxy_requests_total{outcome="stream_error"}'] == 1
