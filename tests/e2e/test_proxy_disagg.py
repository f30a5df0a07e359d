"""The proxy in disagg mode in front of real prefill and decode instances (2P + 2D), READ and WRITE.

Two topologies, each with one role static (URLs on the proxy's command line: health checks, and
`GET /kv_info` for WRITE) and the other registering over ZMQ (`--proxy-address`): READ with static
prefills and registered decodes, WRITE with registered prefills and static decodes.
Each checks: output equal to a standalone instance's at temperature 0 (completions and chat,
streamed or not); a body only the decode half refuses leaves no prefill blocks held; a killed
prefill (kill -9) does not fail requests (retry, then local prefill) and a restarted one is admitted
again (health check / re-registration with a new engine id); a decode killed mid-stream gives the
client an error event at once, later requests go to the other decode; every KV block comes back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import (
    REPO_ROOT,
    TINY_MODEL,
    ServerProcess,
    free_port,
    parse_metrics,
    pdserve_argv,
    pdserve_server,
    wait_healthy,
)

GREEDY = {"temperature": 0.0, "seed": 3}
PROMPTS = ["Hello there", "A longer prompt that spans several KV blocks of sixteen tokens: " + "abc " * 20]
HEARTBEAT_TIMEOUT_S = 1.0


def _serve_options() -> set[str]:
    from pdserve.server.command import add_parser

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_parser(sub)
    return {opt for action in sub.choices["serve"]._actions for opt in action.option_strings}


_REGISTRATION = {"--kv-mode", "--proxy-address"} <= _serve_options()
_NO_REGISTRATION = pytest.mark.skipif(
    not _REGISTRATION, reason="`pdserve serve` has no --kv-mode/--proxy-address yet (KV roles not wired)"
)


def _spawn(argv: list[str], port: int, log_path: Path) -> ServerProcess:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return ServerProcess(proc, port, log_path)


@dataclass
class Topology:
    mode: str  # read | write
    registered: str  # the role that registers over ZMQ; the other one is static
    proxy: ServerProcess
    prefills: list[ServerProcess]
    decodes: list[ServerProcess]
    argv: dict[int, list[str]]  # port -> command line, to restart an instance
    spawned: list[ServerProcess]  # every process started, all stopped at the end

    def rows(self) -> list[dict[str, object]]:
        return httpx.get(self.proxy.base_url + "/instances", timeout=10).json()

    def wait_ready(self, n_prefill: int, n_decode: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.rows() if r["healthy"]]
            counts = (sum(r["role"] == "prefill" for r in rows), sum(r["role"] == "decode" for r in rows))
            if counts == (n_prefill, n_decode):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"healthy (prefill, decode) = {counts}, wanted {(n_prefill, n_decode)}")
            time.sleep(0.1)

    def restart(self, dead: list[ServerProcess]) -> list[ServerProcess]:
        """Start the same command lines again (same ports), all at once."""
        for d in dead:
            d.stop()
        new = [_spawn(self.argv[d.port], d.port, d.log_path) for d in dead]
        self.spawned += new
        for n in new:
            wait_healthy(n)
        return new

    def proxy_metric(self, name: str) -> float:
        return parse_metrics(httpx.get(self.proxy.base_url + "/metrics", timeout=10).text).get(name, 0.0)


@contextlib.contextmanager
def _topology(tmp: Path, mode: str, registered: str) -> Iterator[Topology]:
    registry, proxy_port = free_port(), free_port()
    argv: dict[int, list[str]] = {}
    proxy_argv = pdserve_argv("proxy", "--port", str(proxy_port), "--registry-port", str(registry), "--kv-mode", mode,
                              "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--health-interval", "0.2")
    for role in ("prefill", "prefill", "decode", "decode"):
        port = free_port()
        argv[port] = pdserve_argv("serve", TINY_MODEL, "--port", str(port), "--threads", "1", "--num-kv-blocks",
                                  "256", "--no-access-log", "--role", role, "--kv-mode", mode,
                                  "--trust-request-chat-template")
        if role == registered:
            argv[port] += ["--proxy-address", f"127.0.0.1:{registry}"]
        else:
            proxy_argv += [f"--{role}", f"http://127.0.0.1:{port}"]
    ports = list(argv)
    procs = [_spawn(proxy_argv, proxy_port, tmp / f"proxy-{mode}-{proxy_port}.log")]
    procs += [_spawn(argv[p], p, tmp / f"{mode}-{p}.log") for p in ports]
    try:
        for p in procs:
            wait_healthy(p, "/metrics" if p is procs[0] else "/health")
        topo = Topology(mode, registered, procs[0], procs[1:3], procs[3:5], argv, procs)  # restarts join procs
        topo.wait_ready(2, 2)
        yield topo
        assert topo.proxy.stop() == 0
    finally:
        _stop_all(procs)


def _stop_all(procs: list[ServerProcess]) -> None:
    """SIGTERM every process at once (they drain in parallel), then reap them (kill what remains)."""
    for p in procs:
        if p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(20)
        p.stop()


@pytest.fixture(scope="module")
def reference(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(module_tmp, "--trust-request-chat-template") as s:
        yield s


@pytest.fixture(scope="module", params=[
    pytest.param(("read", "decode"), id="read-static-prefill-registered-decode", marks=_NO_REGISTRATION),
    pytest.param(("write", "prefill"), id="write-registered-prefill-static-decode", marks=_NO_REGISTRATION),
])
def topo(request: pytest.FixtureRequest, module_tmp: Path) -> Iterator[Topology]:
    mode, registered = request.param
    with _topology(module_tmp, mode, registered) as t:
        yield t


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0, timeout=60)


def _outputs(server: ServerProcess) -> list[str]:
    c = _client(server)
    out = []
    for prompt in PROMPTS:
        out.append(c.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=10, **GREEDY).choices[0].text)
        stream = c.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=10, stream=True, **GREEDY)
        out.append("".join(ch.choices[0].text for ch in stream if ch.choices))
        messages = [{"role": "user", "content": prompt}]
        chat = c.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=10, **GREEDY)  # type: ignore[arg-type]
        out.append(chat.choices[0].message.content or "")
        stream = c.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=10, stream=True,  # type: ignore[arg-type]
                                           **GREEDY)
        out.append("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
    return out


def _blocks_all_free(servers: list[ServerProcess], timeout: float = 15.0) -> None:
    """Every KV block free again within `timeout` (under the 30 s lease: nothing waited for it)."""
    for s in servers:
        total = s.metrics()["pdserve_kv_blocks_total"]
        s.wait_metrics({"pdserve_kv_blocks_free": total}, timeout=timeout)


def test_outputs_equal_standalone(topo: Topology, reference: ServerProcess) -> None:
    want = _outputs(reference)
    assert _outputs(topo.proxy) == want and all(want)
    assert topo.proxy_metric('pdserve_proxy_fallbacks_total{reason="prefill_failed"}') == 0
    rows = topo.rows()
    assert all(r["requests"] > 0 for r in rows)  # both prefills and both decodes took part
    _blocks_all_free(topo.prefills + topo.decodes)


def _logprobs(server: ServerProcess) -> list[tuple[list[str], list[float]]]:
    c = _client(server)
    out = []
    for prompt in PROMPTS:
        r = c.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=6, logprobs=2, **GREEDY)
        lp = r.choices[0].logprobs
        assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
        out.append((lp.tokens, lp.token_logprobs))
        stream = c.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": prompt}],  # type: ignore[list-item]
                                           max_tokens=6, logprobs=True, top_logprobs=1, stream=True, **GREEDY)
        chunks = [ch.choices[0].logprobs for ch in stream if ch.choices and ch.choices[0].logprobs]
        items = [i for lp in chunks for i in lp.content or []]
        out.append(([i.token for i in items], [i.logprob for i in items]))
    return out


def test_logprobs_equal_standalone(topo: Topology, reference: ServerProcess) -> None:
    """Every token's logprob comes from the decode half (it samples the first token too, after
    recomputing the prompt's last position): the same tokens and values as a standalone instance."""
    want = _logprobs(reference)
    got = _logprobs(topo.proxy)
    for (w_tokens, w_values), (g_tokens, g_values) in zip(want, got, strict=True):
        assert g_tokens == w_tokens and len(w_tokens) == 6
        assert g_values == pytest.approx(w_values, abs=0.02)  # bf16: the decode-shaped recompute rounds


def test_prefill_prefix_cache_reaches_the_client(topo: Topology, reference: ServerProcess) -> None:
    """A prefill that has seen a prompt's prefix starts from its cached blocks; how many prompt tokens
    it found travels with the KV (kv_transfer_params in READ, write_done in WRITE) into the usage the
    decode reports. The text is the standalone's."""
    system = "A system prompt shared by many requests, long enough for several KV blocks. " * 2
    prompts = [system + f"Question {i}?" for i in range(4)]  # 4 over 2 prefills: one sees it twice
    before = sum(p.metrics()["pdserve_prefix_cache_hits_total"] for p in topo.prefills)
    cached = []
    for prompt in prompts:
        r = _client(topo.proxy).completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=6, **GREEDY)
        want = _client(reference).completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=6, **GREEDY)
        assert r.choices[0].text == want.choices[0].text
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert max(cached) >= len(system) // 16 * 16 - 16 and all(n % 16 == 0 for n in cached)
    after = sum(p.metrics()["pdserve_prefix_cache_hits_total"] for p in topo.prefills)
    assert after - before == sum(cached)
    _blocks_all_free(topo.prefills + topo.decodes)


def test_decode_prefix_cache_skips_the_transfer_of_blocks_it_holds(topo: Topology, reference: ServerProcess) -> None:
    """The same long prompt four times: the two decodes take turns, and each from its second time on
    holds the prompt's leading blocks in its own prefix cache, so only the last block moves (the
    first two requests move the whole prompt). The text is the standalone's every time."""
    prompt = "A conversation so far, sent again with every new turn of the chat. " * 3
    want = _client(reference).completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=5, **GREEDY)
    servers = topo.prefills + topo.decodes

    def moved() -> float:
        return sum(s.metrics()["pdserve_kv_bytes_transferred_total"] for s in servers)

    def hits() -> float:
        return sum(d.metrics()["pdserve_prefix_cache_hits_total"] for d in topo.decodes)

    before, hits_before = moved(), hits()
    sizes = []
    for _ in range(4):
        r = _client(topo.proxy).completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=5, **GREEDY)
        assert r.choices[0].text == want.choices[0].text
        now = moved()
        sizes.append(now - before)
        before = now
    full = max(sizes[:2])
    assert full > 0 and sizes[0] == sizes[1] and max(sizes[2:]) <= full / 4, sizes
    assert hits() - hits_before >= 2 * (len(prompt) // 16 - 1) * 16
    _blocks_all_free(servers)


def test_echo_is_served_by_a_decode_alone(topo: Topology, reference: ServerProcess) -> None:
    """Prompt logprobs need the prompt computed where the answer comes from: the proxy sends an echo
    request to a decode as a plain request (counted as a fallback "echo"), with the standalone's
    answer; a loglikelihood (echo, max_tokens 0) is prefill-only work and goes whole to a prefill."""
    def scored(server: ServerProcess, max_tokens: int) -> tuple[str, list[float | None]]:
        r = _client(server).completions.create(model=TINY_MODEL, prompt=PROMPTS[1], max_tokens=max_tokens,
                                               echo=True, logprobs=1, **GREEDY)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.token_logprobs is not None
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs

    echo = 'pdserve_proxy_fallbacks_total{reason="echo"}'
    one = 'pdserve_proxy_prefill_only_total{reason="one_token"}'
    before = {m: topo.proxy_metric(m) for m in (echo, one)}
    for max_tokens, counted in ((0, one), (3, echo)):
        text, values = scored(topo.proxy, max_tokens)
        want_text, want_values = scored(reference, max_tokens)
        assert text == want_text and text.startswith(PROMPTS[1]) and values[0] is None
        assert values[1:] == pytest.approx(want_values[1:], abs=0.02)
        assert topo.proxy_metric(counted) == before[counted] + 1
    _blocks_all_free(topo.prefills + topo.decodes)


def test_prompt_logprobs_are_served_by_a_decode_alone(topo: Topology, reference: ServerProcess) -> None:
    """vLLM's prompt_logprobs, like echo: the decode computes the prompt itself (fallback
    "prompt_logprobs"), completions and chat, with the standalone's values; return_token_ids goes
    through the disaggregated path unchanged (the decode answers with the prompt's and its ids)."""
    def scored(server: ServerProcess) -> tuple[list, list]:
        client = _client(server)
        c = client.completions.create(model=TINY_MODEL, prompt=PROMPTS[1], max_tokens=2, extra_body={
            "prompt_logprobs": 1}, **GREEDY)
        chat = client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=2, extra_body={"prompt_logprobs": 0}, **GREEDY)
        assert c.choices[0].model_extra and chat.model_extra
        return c.choices[0].model_extra["prompt_logprobs"], chat.model_extra["prompt_logprobs"]

    def values(plps: list) -> list[float]:
        return [v["logprob"] for entry in plps[1:] for v in entry.values()]

    metric = 'pdserve_proxy_fallbacks_total{reason="prompt_logprobs"}'
    before = topo.proxy_metric(metric)
    got, want = scored(topo.proxy), scored(reference)
    for g, w in zip(got, want, strict=True):
        assert g[0] is None and [list(e) for e in g[1:]] == [list(e) for e in w[1:]]
        assert values(g) == pytest.approx(values(w), abs=0.02)
    assert topo.proxy_metric(metric) == before + 2

    ids = _client(topo.proxy).completions.create(model=TINY_MODEL, prompt=PROMPTS[1], max_tokens=4,
                                                 extra_body={"return_token_ids": True}, **GREEDY)
    want_ids = _client(reference).completions.create(model=TINY_MODEL, prompt=PROMPTS[1], max_tokens=4,
                                                     extra_body={"return_token_ids": True}, **GREEDY)
    extra, want_extra = ids.choices[0].model_extra, want_ids.choices[0].model_extra
    assert extra and want_extra and extra["prompt_token_ids"] == want_extra["prompt_token_ids"]
    assert extra["token_ids"] == want_extra["token_ids"] and len(extra["token_ids"]) == 4
    _blocks_all_free(topo.prefills + topo.decodes)


def test_batch_of_prompts_is_served_by_a_decode_alone(topo: Topology, reference: ServerProcess) -> None:
    """Several prompts in one completions request: a KV transfer is for one prompt, so the proxy sends
    the batch to a decode as a plain request (fallback "batch"); the choices equal a standalone's."""
    def texts(server: ServerProcess) -> list[str]:
        r = _client(server).completions.create(model=TINY_MODEL, prompt=PROMPTS, max_tokens=5, **GREEDY)
        return [c.text for c in r.choices]

    before = topo.proxy_metric('pdserve_proxy_fallbacks_total{reason="batch"}')
    assert texts(topo.proxy) == texts(reference)
    assert topo.proxy_metric('pdserve_proxy_fallbacks_total{reason="batch"}') == before + 1
    _blocks_all_free(topo.prefills + topo.decodes)


def test_beam_search_is_served_by_a_decode_alone(topo: Topology, reference: ServerProcess) -> None:
    """vLLM's use_beam_search sends every beam as a prompt of its own each step: the proxy sends the
    request to a decode whole (fallback "beam_search"), whose beams equal a standalone's."""
    def beams(server: ServerProcess) -> list[str]:
        r = _client(server).completions.create(model=TINY_MODEL, prompt=PROMPTS[1], max_tokens=4, n=3,
                                               extra_body={"use_beam_search": True, "ignore_eos": True}, **GREEDY)
        return [c.text for c in r.choices]

    metric = 'pdserve_proxy_fallbacks_total{reason="beam_search"}'
    before = topo.proxy_metric(metric)
    assert beams(topo.proxy) == beams(reference)
    assert topo.proxy_metric(metric) == before + 1
    _blocks_all_free(topo.prefills + topo.decodes)


def test_truncate_prompt_tokens_through_both_halves(topo: Topology, reference: ServerProcess) -> None:
    """vLLM's truncate_prompt_tokens k: both halves keep the same last k tokens (the prefills compute
    k tokens, the transfer matches the decode's prompt), with the standalone's answer; -1, which
    depends on max_tokens (1 in a prefill half), goes to a decode alone (fallback "truncate_prompt_tokens")."""
    def run(server: ServerProcess, k: int) -> list[tuple[str, int]]:
        client, extra = _client(server), {"truncate_prompt_tokens": k}
        c = client.completions.create(model=TINY_MODEL, prompt=PROMPTS[1], max_tokens=5, extra_body=extra, **GREEDY)
        chat = client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": PROMPTS[1]}],
                                              max_tokens=5, extra_body=extra, **GREEDY)
        assert c.usage is not None and chat.usage is not None
        return [(c.choices[0].text, c.usage.prompt_tokens), (chat.choices[0].message.content or "",
                                                              chat.usage.prompt_tokens)]

    def prefilled(expected: float | None = None) -> float:
        """Prompt tokens the prefills finished, polled until `expected` (a half is counted as it ends)."""
        deadline = time.monotonic() + 10
        while True:
            n = sum(p.metrics().get("pdserve_prompt_tokens_total", 0.0) for p in topo.prefills)
            if expected is None or n == expected or time.monotonic() > deadline:
                return n
            time.sleep(0.1)

    metric = 'pdserve_proxy_fallbacks_total{reason="truncate_prompt_tokens"}'
    before, tokens = topo.proxy_metric(metric), prefilled()
    got = run(topo.proxy, 40)
    assert got == run(reference, 40) and [n for _, n in got] == [40, 40]
    assert prefilled(tokens + 80) == tokens + 80 and topo.proxy_metric(metric) == before
    assert run(topo.proxy, -1) == run(reference, -1)
    assert prefilled() == tokens + 80 and topo.proxy_metric(metric) == before + 2
    _blocks_all_free(topo.prefills + topo.decodes)


def test_background_response_through_both_halves(topo: Topology, reference: ServerProcess) -> None:
    """A background /v1/responses request, disaggregated: the create call answers at once, the
    prefill half computes the prompt (in WRITE mode the proxy commits the pair on the prefill's
    answer, not after a grace second), and the response the decode stores equals the standalone's."""
    ask = {"model": TINY_MODEL, "input": PROMPTS[1], "max_output_tokens": 8, "temperature": 0.0}
    want = _client(reference).responses.create(**ask)  # type: ignore[call-overload]
    client = _client(topo.proxy)
    before = sum(s.metrics()["pdserve_kv_transfers_total"] for s in topo.prefills + topo.decodes)
    bg = client.responses.create(background=True, **ask)  # type: ignore[call-overload]
    assert bg.status in ("queued", "in_progress")
    deadline = time.monotonic() + 30
    while (got := client.responses.retrieve(bg.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, "the background response did not end"
        time.sleep(0.1)
    assert got.status == want.status and got.output_text == want.output_text and got.output_text
    assert sum(s.metrics()["pdserve_kv_transfers_total"] for s in topo.prefills + topo.decodes) > before
    _blocks_all_free(topo.prefills + topo.decodes)


def test_n_choices_share_one_kv_transfer(topo: Topology, reference: ServerProcess) -> None:
    """n > 1 is disaggregated: the prefill half computes one choice, one KV transfer feeds the decode,
    whose other choices start from its prefix cache once the first has its first token. The choices
    (streamed or not) equal a standalone instance's; no fallback, as many transfers as for n = 1."""
    servers = topo.prefills + topo.decodes
    body = {"model": TINY_MODEL, "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 1.0, "seed": 5}

    def transfers() -> float:
        return sum(s.metrics()["pdserve_kv_transfers_total"] for s in servers)

    def texts(server: ServerProcess, n: int, stream: bool = False) -> list[str]:
        c = _client(server)
        if not stream:
            return [ch.text for ch in c.completions.create(**body, n=n).choices]
        out = [""] * n
        for chunk in c.completions.create(**body, n=n, stream=True):
            for ch in chunk.choices:
                out[ch.index] += ch.text
        return out

    t0 = transfers()
    texts(topo.proxy, 1)
    one = transfers() - t0
    hits = sum(d.metrics()["pdserve_prefix_cache_hits_total"] for d in topo.decodes)
    want = texts(reference, 3)
    assert texts(topo.proxy, 3) == want and len(set(want)) > 1
    assert texts(topo.proxy, 3, stream=True) == want
    assert transfers() - t0 - one == 2 * one > 0
    assert sum(d.metrics()["pdserve_prefix_cache_hits_total"] for d in topo.decodes) - hits >= 4 * 16
    assert topo.proxy_metric("pdserve_proxy_fallbacks_total{reason=\"n\"}") == 0
    _blocks_all_free(servers)


def test_structured_outputs_through_both_halves(topo: Topology, reference: ServerProcess) -> None:
    """The decode half samples every token the client sees, the first one included, under the
    constraint: the JSON equals a standalone instance's for the same seed, and obeys the schema."""
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "visits"],
              "properties": {"city": {"type": "string", "maxLength": 8}, "visits": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}

    def answer(server: ServerProcess) -> str:
        r = _client(server).chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": PROMPTS[1]}], response_format=fmt,  # type: ignore[arg-type]
            max_tokens=60, temperature=1.0, seed=9)
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content or ""

    got = answer(topo.proxy)
    assert got == answer(reference) and set(json.loads(got)) == {"city", "visits"}
    tools = [{"type": "function", "function": {"name": "plan_trip", "parameters": schema}}]

    def call(server: ServerProcess) -> tuple[str, str]:
        r = _client(server).chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], tools=tools,  # type: ignore[arg-type]
            tool_choice="required", parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=9)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls
        fn = r.choices[0].message.tool_calls[0].function  # type: ignore[union-attr]
        return fn.name, fn.arguments

    assert call(topo.proxy) == call(reference)
    _blocks_all_free(topo.prefills + topo.decodes)


def test_refused_decode_half_frees_the_prefill_blocks(topo: Topology) -> None:
    """A body only the decode half refuses (the prefill half is sent max_tokens=1, no min_tokens): the
    prefill computed the prompt (in WRITE mode at the same time) and would keep its KV blocks for the
    30 s lease; the proxy drops that half and tells the prefill (notify `Abort`): the blocks are back at once."""
    for bad in ({"max_tokens": -1}, {"max_tokens": 2, "min_tokens": 5}):
        for prompt in PROMPTS:
            body = {"model": TINY_MODEL, "prompt": prompt, **bad}
            r = httpx.post(topo.proxy.v1_url + "/completions", json=body, timeout=30)
            assert r.status_code == 400, r.text
    _blocks_all_free(topo.prefills + topo.decodes, timeout=5)


def test_prefill_killed_then_restarted(topo: Topology, reference: ServerProcess) -> None:
    c, prompt = _client(topo.proxy), PROMPTS[1]
    want = _client(reference).completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=8, **GREEDY)
    topo.prefills[0].proc.send_signal(signal.SIGKILL)
    for _ in range(4):  # the dead prefill is retried around
        assert c.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=8, **GREEDY).choices[0].text == \
            want.choices[0].text
    assert topo.proxy_metric('pdserve_proxy_fallbacks_total{reason="prefill_failed"}') == 0
    topo.prefills[1].proc.send_signal(signal.SIGKILL)
    for _ in range(2):  # no prefill left: local prefill on the decode instance
        assert c.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=8, **GREEDY).choices[0].text == \
            want.choices[0].text
    topo.wait_ready(0, 2)
    assert httpx.get(topo.proxy.base_url + "/health").status_code == 503
    topo.prefills = topo.restart(topo.prefills)  # same ports: re-registered / health-checked again
    topo.wait_ready(2, 2)
    assert httpx.get(topo.proxy.base_url + "/health").status_code == 200
    before = {r["address"]: r["requests"] for r in topo.rows() if r["role"] == "prefill"}
    fallbacks = topo.proxy_metric('pdserve_proxy_fallbacks_total{reason="no_prefill"}') + topo.proxy_metric(
        'pdserve_proxy_fallbacks_total{reason="prefill_failed"}')
    for _ in range(2):
        assert c.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=8, **GREEDY).choices[0].text == \
            want.choices[0].text
    after = {r["address"]: r["requests"] for r in topo.rows() if r["role"] == "prefill"}
    assert sum(after.values()) - sum(before.values()) == 2
    assert topo.proxy_metric('pdserve_proxy_fallbacks_total{reason="no_prefill"}') + topo.proxy_metric(
        'pdserve_proxy_fallbacks_total{reason="prefill_failed"}') == fallbacks
    _blocks_all_free(topo.prefills + topo.decodes)


def test_decode_killed_mid_stream(topo: Topology) -> None:
    body = {"model": TINY_MODEL, "prompt": PROMPTS[0], "max_tokens": 3000, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", topo.proxy.v1_url + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        while len([x for x in lines if x.startswith("data: ")]) < 5:
            lines.append(next(it))
        busy = next(r["address"] for r in topo.rows() if r["role"] == "decode" and r["in_flight"] == 1)
        victim = next(d for d in topo.decodes if d.base_url.endswith(str(busy)))
        victim.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        lines.extend(it)
        waited = time.monotonic() - t0
    events = [x.removeprefix("data: ") for x in lines if x.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"error"' in events[-2] and waited < HEARTBEAT_TIMEOUT_S + 1
    survivor = next(d for d in topo.decodes if d is not victim)
    before = survivor.metrics().get('pdserve_requests_total{finish_reason="length"}', 0)
    c = _client(topo.proxy)
    for _ in range(3):
        c.completions.create(model=TINY_MODEL, prompt=PROMPTS[1], max_tokens=4, **GREEDY)
    assert survivor.metrics()['pdserve_requests_total{finish_reason="length"}'] - before == 3
    topo.wait_ready(2, 1)
    topo.decodes = [survivor]
    _blocks_all_free(topo.prefills + topo.decodes)


def test_vllm_request_extras_through_both_halves(topo: Topology, reference: ServerProcess) -> None:
    """The prefill half samples one token the client never sees; the decode half samples every
    token shown, under allowed_token_ids and bad_words, ends at the stop string it keeps
    (include_stop_str_in_output) and shows logprob tokens as ids: the standalone's answer, streamed
    or not. cache_salt reaches both halves' prefix caches: a new salt finds nothing cached. The
    proxy answers vLLM's /version and /ping itself."""
    extras = {"allowed_token_ids": [32, 97, 98, 99], "bad_words": ["ca", "aa"], "stop": ["cb"],
              "include_stop_str_in_output": True, "return_tokens_as_token_ids": True, "ignore_eos": True}

    def answers(server: ServerProcess) -> list[tuple[str, list[str]]]:
        c, out = _client(server), []
        for stream in (False, True):
            r = c.completions.create(model=TINY_MODEL, prompt=PROMPTS[1], max_tokens=12, logprobs=1, stream=stream,
                                     extra_body=extras, **GREEDY)  # type: ignore[call-overload]
            choices = [ch for chunk in r for ch in chunk.choices] if stream else r.choices
            tokens = [t for ch in choices if ch.logprobs for t in ch.logprobs.tokens or []]
            out.append(("".join(ch.text for ch in choices), tokens))
        return out

    got = answers(topo.proxy)
    assert got == answers(reference) and got[0] == got[1]
    text, tokens = got[0]
    assert set(text) <= set(" abc") and "ca" not in text and "aa" not in text
    assert all(t.startswith("token_id:") for t in tokens) and tokens
    prompt = "A prompt under a fresh cache salt each time, long enough for several KV blocks. " * 2

    def cached(salt: str) -> int:
        r = _client(topo.proxy).completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=2,
                                                   extra_body={"cache_salt": salt}, **GREEDY)  # type: ignore[call-overload]
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return r.usage.prompt_tokens_details.cached_tokens or 0

    assert [cached(salt) for salt in ("s1", "s2", "s3")] == [0, 0, 0]
    assert max(cached("shared") for _ in range(4)) > 0  # 4 over 2 prefills: one sees it twice
    from pdserve import __version__

    assert httpx.get(topo.proxy.base_url + "/version").json() == {"version": __version__}
    assert all(httpx.request(m, topo.proxy.base_url + "/ping").status_code == 200 for m in ("GET", "POST"))
    _blocks_all_free(topo.prefills + topo.decodes)


def test_request_chat_template_reaches_both_halves(topo: Topology, reference: ServerProcess) -> None:
    """vLLM's per-request chat_template (and chat_template_kwargs) is forwarded as sent: the prefill
    half renders the same prompt as the decode half (the prefills count its tokens, no fallback),
    so the answer is the standalone's, streamed or not; a template that fails is the instances'
    400 naming the field."""
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} ({{ tag }})\n{% endfor %}reply:"
    extra = {"chat_template": template, "chat_template_kwargs": {"tag": "t1"}, "return_token_ids": True}
    messages = [{"role": "user", "content": PROMPTS[1]}]

    def answers(server: ServerProcess) -> list[tuple[str, list[int]]]:
        c, out = _client(server), []
        for stream in (False, True):
            r = c.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8, stream=stream,  # type: ignore[call-overload]
                                          extra_body=extra, **GREEDY)
            if stream:
                chunks = list(r)
                prompt = next(ch.model_extra["prompt_token_ids"] for ch in chunks if ch.model_extra)
                out.append(("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), prompt))
            else:
                out.append((r.choices[0].message.content or "", r.model_extra["prompt_token_ids"]))
        return out

    rendered = f"user: {PROMPTS[1]} (t1)\nreply:"
    want_ids = httpx.post(reference.base_url + "/tokenize", json={"prompt": rendered, "add_special_tokens": False},
                          timeout=10).json()["tokens"]
    plain = httpx.post(reference.base_url + "/tokenize", json={"messages": messages}, timeout=10).json()["count"]
    assert len(want_ids) != plain  # the tokenizer's own template would give another prompt
    fallbacks = topo.proxy_metric('pdserve_proxy_fallbacks_total{reason="prefill_failed"}')

    def prefilled() -> float:
        return sum(p.metrics().get("pdserve_prompt_tokens_total", 0.0) for p in topo.prefills)

    before = prefilled()
    got = answers(topo.proxy)
    assert got == answers(reference) and got[0] == got[1] and got[0][1] == want_ids and got[0][0]
    deadline = time.monotonic() + 15
    while prefilled() - before != 2 * len(want_ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert prefilled() - before == 2 * len(want_ids)  # both requests' prefill halves rendered the same prompt
    assert topo.proxy_metric('pdserve_proxy_fallbacks_total{reason="prefill_failed"}') == fallbacks
    for stream in (False, True):
        r = httpx.post(topo.proxy.base_url + "/v1/chat/completions", timeout=30, json={
            "model": TINY_MODEL, "messages": messages, "max_tokens": 2, "stream": stream,
            "chat_template": "{{ raise_exception('refused by the template') }}"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "chat_template" and "refused by the template" in r.text
    _blocks_all_free(topo.prefills + topo.decodes)

