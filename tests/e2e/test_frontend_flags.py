"""vLLM's front-end flags on real processes: `--config` (YAML), CORS, TLS (client certificates
too), `--root-path`, `--uvicorn-log-level`, `--enable-log-requests` / `--max-log-len`, on an instance
and on a proxy in front of it, which reaches the HTTPS instance when it registers itself and when
it is named by an https:// URL; `pdserve up` with an HTTPS proxy.

One instance serves every test of the module: HTTPS requiring a client certificate (the
self-signed one, its own CA), configured by a YAML file. The proxy in front of it serves HTTPS too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest

from pdserve.launch import launch_topology, parse_topology
from pdserve.proxy.settings import InstanceTLS, ProxySettings
from tests.e2e.conftest import REPO_ROOT, STARTUP_TIMEOUT_S, TINY_MODEL, ServerProcess, free_port, pdserve_argv
from tests.e2e.tls_cert import SelfSigned, self_signed
from tests.unit.test_proxy_fakes import running_proxy, until

ORIGIN = "https://app.example"


@dataclass
class Stack:
    cert: SelfSigned
    instance: ServerProcess
    proxy: ServerProcess

    @property
    def instance_url(self) -> str:
        return f"https://127.0.0.1:{self.instance.port}"

    @property
    def proxy_url(self) -> str:
        return f"https://127.0.0.1:{self.proxy.port}"


def _start(argv: list[str], port: int, log_path: Path) -> ServerProcess:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return ServerProcess(proc, port, log_path)


def _wait(server: ServerProcess, url: str, ctx: ssl.SSLContext) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"exited with {server.proc.returncode} during startup:\n{server.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, verify=ctx, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not 200 after {STARTUP_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="module")
def stack(module_tmp: Path) -> Iterator[Stack]:
    cert = self_signed(module_tmp)
    proxy_port, registry_port, port = free_port(), free_port(), free_port()
    proxy = _start(pdserve_argv(
        "proxy", "--port", str(proxy_port), "--mode", "standard", "--registry-port", str(registry_port),
        "--ssl-certfile", str(cert.cert), "--ssl-keyfile", str(cert.key),
        "--allowed-origins", f'["{ORIGIN}"]', "--root-path", "/gw", "--uvicorn-log-level", "error",
        "--instance-ssl-ca-certs", str(cert.cert), "--instance-ssl-certfile", str(cert.cert),
        "--instance-ssl-keyfile", str(cert.key),
    ), proxy_port, module_tmp / "proxy.log")
    config = module_tmp / "serve.yaml"
    config.write_text(f"""\
model: {TINY_MODEL}
port: 1                       # the command line's --port wins
threads: 1
num_kv_blocks: 256            # underscores, as vLLM accepts
served-model-name: [tiny, tiny-chat]
ssl-certfile: {cert.cert}
ssl_keyfile: {cert.key}
ssl-ca-certs: {cert.cert}
ssl-cert-reqs: 2
allowed-origins: ["{ORIGIN}"]
root-path: /llm
enable-log-requests: true
max-log-len: 3
enable-prefix-caching: false
""")
    instance = _start(pdserve_argv(
        "serve", "--config", str(config), "--port", str(port), "--proxy-address", f"127.0.0.1:{registry_port}",
    ), port, module_tmp / "serve.log")
    try:
        # The proxy's /health is 200 once the instance has registered (as https://) and is healthy.
        _wait(proxy, f"https://127.0.0.1:{proxy_port}/health", cert.client_context(with_client_cert=False))
        yield Stack(cert, instance, proxy)
    finally:
        instance.stop()
        proxy.stop()


def _client(stack: Stack, base_url: str, with_client_cert: bool = True) -> httpx.Client:
    return httpx.Client(base_url=base_url, verify=stack.cert.client_context(with_client_cert), timeout=30,
                        trust_env=False)


def test_instance_serves_https_to_the_openai_client(stack: Stack) -> None:
    """--ssl-certfile / --ssl-keyfile from the YAML file, --ssl-cert-reqs 2 with --ssl-ca-certs: the
    official client with the client certificate is served; without it, or over plain HTTP, nothing."""
    with _client(stack, stack.instance_url) as http:
        client = openai.OpenAI(base_url=f"{stack.instance_url}/v1", api_key="none", http_client=http)
        out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens == 4
        chat = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3)
        assert chat.choices[0].message.content is not None
    with _client(stack, stack.instance_url, with_client_cert=False) as http, pytest.raises(httpx.TransportError):
        http.get("/health")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{stack.instance.port}/health", timeout=5, trust_env=False)
    log = stack.instance.log()
    assert f"Uvicorn running on https://127.0.0.1:{stack.instance.port}" in log  # the command line's port


def test_cors_on_the_instance(stack: Stack) -> None:
    with _client(stack, stack.instance_url) as http:
        pre = http.options("/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"]
        assert "access-control-allow-credentials" not in pre.headers  # --allow-credentials not given
        simple = http.get("/v1/models", headers={"Origin": ORIGIN})
        assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ORIGIN
        assert [m["id"] for m in simple.json()["data"]] == ["tiny", "tiny-chat"]
        other = http.get("/v1/models", headers={"Origin": "https://elsewhere.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
        refused = http.options("/v1/completions", headers={
            "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_root_path_and_request_log(stack: Stack) -> None:
    """--root-path: requests come as a path-rewriting reverse proxy forwards them (without the
    prefix), the OpenAPI document names the prefix. --enable-log-requests with --max-log-len 3."""
    with _client(stack, stack.instance_url) as http:
        assert http.get("/openapi.json").json()["servers"] == [{"url": "/llm"}]
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "one two three four five", "max_tokens": 2},
                      headers={"X-Request-Id": "logged-request-1"})
        assert r.status_code == 200
    deadline = time.monotonic() + 5
    while "logged-request-1" not in stack.instance.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in stack.instance.log().splitlines() if "Received request logged-request-1" in x)
    assert "pdserve.server.requests" in line and "(first 3 of " in line and "max_tokens=2" in line


def test_proxy_reaches_a_registered_https_instance(stack: Stack) -> None:
    """The instance registered as https://; the proxy (HTTPS itself, --root-path /gw) calls it with its
    client certificate, generation (the raw hot path) and the admin paths alike."""
    with _client(stack, stack.proxy_url, with_client_cert=False) as http:
        rows = http.get("/instances").json()
        assert [(r["url"], r["healthy"]) for r in rows] == [(stack.instance_url, True)]
        client = openai.OpenAI(base_url=f"{stack.proxy_url}/v1", api_key="none", http_client=http)
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", "tiny-chat"]
        assert http.get("/openapi.json").json()["servers"] == [{"url": "/gw"}]
    assert "Uvicorn running on" not in stack.proxy.log()  # --uvicorn-log-level error


def test_cors_on_the_proxy(stack: Stack) -> None:
    with _client(stack, stack.proxy_url, with_client_cert=False) as http:
        pre = http.options("/v1/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                      headers={"Origin": ORIGIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert http.get("/health", headers={"Origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN
        assert "access-control-allow-origin" not in http.get("/health", headers={"Origin": "https://x.example"}).headers


def test_proxy_with_a_static_https_url(stack: Stack) -> None:
    """--instance https://...: checked against --instance-ssl-ca-certs; with the system's CAs only,
    the self-signed instance is unhealthy (certificates are checked)."""
    tls = InstanceTLS(str(stack.cert.cert), str(stack.cert.cert), str(stack.cert.key))

    async def go() -> None:
        settings = ProxySettings(mode="standard", registry_port=None, instances=(stack.instance_url,), instance_tls=tls)
        async with running_proxy(settings) as proxy, aiohttp.ClientSession() as session:
            await until(lambda: all(i.healthy for i in proxy.state.table.all()), timeout=10)
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
            async with session.post(f"{proxy.url}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
        untrusted = ProxySettings(mode="standard", registry_port=None, instances=(stack.instance_url,))
        async with running_proxy(untrusted) as proxy, aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.url}/health") as r:
                assert r.status == 503
            [inst] = proxy.state.table.all()
            assert not inst.healthy

    asyncio.run(go())


def test_up_serves_its_proxy_over_https(stack: Stack, tmp_path: Path) -> None:
    """`pdserve up --ssl-certfile`: the proxy it starts serves HTTPS (its instances plain HTTP on
    loopback), and up waits for it over HTTPS."""
    cert = stack.cert
    spec = parse_topology("standard:1", TINY_MODEL, run_dir=str(tmp_path), startup_timeout_s=120,
                          engine_args=("--num-kv-blocks", "128", "--max-model-len", "512"),
                          proxy_args=("--ssl-certfile", str(cert.cert), "--ssl-keyfile", str(cert.key)),
                          proxy_scheme="https")
    with launch_topology(spec) as topo:
        assert topo.url.startswith("https://")
        with _client(stack, topo.url, with_client_cert=False) as http:
            r = http.post("/v1/completions", json={"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
