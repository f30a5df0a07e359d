"""Two `--role both` instances behind `pdserve proxy`: each is the prefill half of some requests and
the decode half of others, in WRITE (registered, least-loaded) and READ (static URLs named by both
--prefill and --decode); a proxy whose only instance is one both instance sends it the plain
request. Greedy outputs equal a standalone reference's; every KV block comes back. And vLLM's
`--kv-transfer-config` starts a both instance, or fails with a CLI error naming the flag.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import (
    REPO_ROOT,
    TINY_MODEL,
    ServerProcess,
    free_port,
    launch,
    parse_metrics,
    pdserve_argv,
    pdserve_server,
)

GREEDY = {"temperature": 0.0, "seed": 3}
PROMPTS = ["Hello there", "A longer prompt that spans several KV blocks of sixteen tokens: " + "abc " * 20,
           "Tell me about prefill and decode", "x y z " * 12]
BOTH_CONFIG = '{"kv_connector":"PdserveConnector","kv_role":"kv_both"}'
PREFILLS = "pdserve_kv_prefill_halves_total"
DECODES = "pdserve_kv_decode_halves_total"


@contextlib.contextmanager
def _proxy(tmp: Path, name: str, *args: str) -> Iterator[ServerProcess]:
    port = free_port()
    argv = pdserve_argv("proxy", "--port", str(port), "--health-interval", "0.2", "--heartbeat-timeout", "2", *args)
    with launch(argv, port, tmp / f"proxy-{name}.log", "/metrics") as proxy:
        yield proxy


def _wait_ready(proxy: ServerProcess, n: int, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        rows = httpx.get(proxy.base_url + "/instances", timeout=10).json()
        if sum(r["healthy"] for r in rows) == n and httpx.get(proxy.base_url + "/health").status_code == 200:
            return
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


@pytest.fixture(scope="module")
def env(module_tmp: Path) -> Iterator[dict[str, ServerProcess]]:
    registry = free_port()
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(pdserve_server(module_tmp))
        write = stack.enter_context(_proxy(module_tmp, "write", "--registry-port", str(registry), "--kv-mode", "write",
                                           "--routing", "least-loaded"))
        a = stack.enter_context(pdserve_server(module_tmp, "--role", "both", "--kv-mode", "write",
                                               "--proxy-address", f"127.0.0.1:{registry}"))
        # The other one started with vLLM's flag: a both instance whose --kv-mode is read (the default),
        # which still serves WRITE halves (each request's transfer_mode decides).
        b = stack.enter_context(pdserve_server(module_tmp, "--kv-transfer-config", BOTH_CONFIG,
                                               "--proxy-address", f"127.0.0.1:{registry}"))
        _wait_ready(write, 2)
        read = stack.enter_context(_proxy(module_tmp, "read", "--no-registry", "--kv-mode", "read",
                                          "--prefill", a.base_url, b.base_url, "--decode", a.base_url, b.base_url))
        _wait_ready(read, 2)
        alone = stack.enter_context(_proxy(module_tmp, "alone", "--no-registry", "--kv-mode", "read",
                                           "--prefill", a.base_url, "--decode", a.base_url))
        _wait_ready(alone, 1)
        yield {"ref": ref, "a": a, "b": b, "write": write, "read": read, "alone": alone}


def _outputs(server: ServerProcess) -> list[str]:
    c = openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0, timeout=60)
    out = []
    for prompt in PROMPTS:
        out.append(c.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=8, **GREEDY).choices[0].text)
        messages = [{"role": "user", "content": prompt}]
        stream = c.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=8, stream=True,  # type: ignore[arg-type]
                                           **GREEDY)
        out.append("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
    return out


def _halves(s: ServerProcess) -> tuple[float, float]:
    m = s.metrics()
    return m.get(PREFILLS, 0.0), m.get(DECODES, 0.0)


def _blocks_all_free(*servers: ServerProcess) -> None:
    for s in servers:
        total = s.metrics()["pdserve_kv_blocks_total"]
        s.wait_metrics({"pdserve_kv_blocks_free": total}, timeout=15)


def _proxy_metrics(proxy: ServerProcess) -> dict[str, float]:
    return parse_metrics(httpx.get(proxy.base_url + "/metrics", timeout=10).text)


@pytest.mark.parametrize("proxy", ["write", "read"])
def test_both_instances_disaggregate_in_both_directions(env: dict[str, ServerProcess], proxy: str) -> None:
    want = _outputs(env["ref"])
    before = {k: _halves(env[k]) for k in ("a", "b")}
    assert _outputs(env[proxy]) == want and all(want)
    n = len(want)
    after = {k: _halves(env[k]) for k in ("a", "b")}
    grew = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    # Every request went through both halves, on two different instances; each did both jobs.
    assert sum(p for p, _ in grew.values()) == n and sum(d for _, d in grew.values()) == n, grew
    assert all(p > 0 and d > 0 for p, d in grew.values()), grew
    m = _proxy_metrics(env[proxy])
    assert not any(k.startswith("pdserve_proxy_fallbacks_total") and v for k, v in m.items()), m
    assert m.get("pdserve_proxy_same_instance_total", 0) == 0
    _blocks_all_free(env["a"], env["b"])


def test_same_instance_pick_goes_plain(env: dict[str, ServerProcess]) -> None:
    want = _outputs(env["ref"])
    before = _halves(env["a"])
    assert _outputs(env["alone"]) == want
    assert _halves(env["a"]) == before  # no KV moved: neither half served
    m = _proxy_metrics(env["alone"])
    assert m["pdserve_proxy_same_instance_total"] == len(want)
    assert not any(k.startswith("pdserve_proxy_fallbacks_total") and v for k, v in m.items()), m
    assert not any(k.startswith("pdserve_proxy_upstream_failures_total") and v for k, v in m.items()), m
    info = httpx.get(env["a"].base_url + "/kv_info", timeout=10).json()
    assert info["role"] == "both"
    _blocks_all_free(env["a"])


@pytest.mark.parametrize(("config", "extra", "message"), [
    ('{"kv_connector":"PdserveConnector","kv_role":"kv_everything"}', (),
     "kv_role 'kv_everything' is not one of kv_producer, kv_consumer, kv_both"),
    ('{"kv_connector":"P2pNcclConnector","kv_role":"kv_both"}', (),
     "kv_connector 'P2pNcclConnector' is not supported; pdserve serves NixlConnector and PdserveConnector"),
    ('{"kv_connector":"PdserveConnector","kv_role":"kv_both","kv_bogus":1}', (), "unknown field `kv_bogus`"),
    (BOTH_CONFIG, ("--role", "prefill"), "kv_role (both) conflicts with --role prefill"),
    ('{"kv_connector":"NixlConnector","kv_role":"kv_producer"}', ("--kv-transport", "tcp"),
     "conflicts with --kv-transport tcp"),
    ("{not json", (), "not valid JSON"),
])
def test_bad_kv_transfer_config_is_a_cli_error(config: str, extra: tuple[str, ...], message: str) -> None:
    argv = pdserve_argv("serve", TINY_MODEL, "--port", str(free_port()), "--kv-transfer-config", config, *extra)
    r = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--kv-transfer-config" in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_kv_transfer_config_maps_onto_the_flags() -> None:
    import argparse

    from pdserve.server.command import add_parser
    from pdserve.server.kv_args import kv_transfer_config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    config = {"kv_connector": "NixlConnector", "kv_role": "kv_consumer", "kv_ip": "10.1.2.3", "kv_port": 14579,
              "kv_load_failure_policy": "recompute", "engine_id": "ignored", "kv_buffer_device": "cpu",
              "kv_connector_extra_config": {"kv_mode": "WRITE", "kv_lease_seconds": 5, "backends": ["UCX"]}}
    args = parser.parse_args(["serve", TINY_MODEL, "--kv-transfer-config", json.dumps(config), "--kv-mode", "write"])
    kt = kv_transfer_config_from_args(args)
    assert (kt.role, kt.kv_transport, kt.kv_host, kt.kv_handshake_port) == ("decode", "nixl", "10.1.2.3", 14579)
    assert (kt.kv_mode, kt.kv_lease_seconds, kt.kv_load_failure_policy) == ("write", 5.0, "recompute")
