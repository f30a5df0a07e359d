"""vLLM's front-end flags on `serve`, `proxy` and `up`: defaults (vLLM's), settings, usage errors
naming the flag, the proxy app's CORS in process, `up`'s flags for the proxy it starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from pdserve.cli import build_parser, main
from pdserve.config import CORSConfig, FrontendConfig
from pdserve.launch_command import spec_from_args
from pdserve.proxy.app import build_app, route_path
from pdserve.proxy.command import settings_from_args as proxy_settings
from pdserve.proxy.settings import ProxySettings
from pdserve.server.command import settings_from_args as server_settings
from tests.e2e.tls_cert import self_signed


def test_defaults_are_vllms_but_no_cors_origin() -> None:
    serve = server_settings(build_parser().parse_args(["serve", "m"]))
    proxy = proxy_settings(build_parser().parse_args(["proxy"]))
    for front in (serve.frontend, proxy.frontend):
        assert front.cors == CORSConfig((), ("*",), ("*",), False)  # vLLM allows origin "*"
        assert not front.tls.enabled and front.tls.scheme == "http" and front.root_path == ""
        assert front.uvicorn_options("warning")["log_level"] == "warning"  # --uvicorn-log-level: --log-level's
    assert serve.frontend.access_log and not proxy.frontend.access_log
    assert not serve.enable_log_requests and serve.max_log_len is None


def test_flags_reach_the_settings(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    args = build_parser().parse_args([
        "serve", "m", "--allowed-origins", '["https://a.example"]', "--allowed-methods", '["GET", "POST"]',
        "--allowed-headers", '["authorization"]', "--allow-credentials", "--ssl-certfile", str(cert.cert),
        "--ssl-keyfile", str(cert.key), "--ssl-ca-certs", str(cert.cert), "--ssl-cert-reqs", "2",
        "--root-path", "/llm/", "--uvicorn-log-level", "trace", "--disable-uvicorn-access-log",
        "--enable-log-requests", "--max-log-len", "10"])
    s = server_settings(args)
    assert s.frontend.cors == CORSConfig(("https://a.example",), ("GET", "POST"), ("authorization",), True)
    assert (s.frontend.tls.scheme, s.frontend.tls.cert_reqs, s.frontend.root_path) == ("https", 2, "/llm")
    options = s.frontend.uvicorn_options("info")
    assert (options["log_level"], options["access_log"], options["ssl_certfile"]) == ("trace", False, str(cert.cert))
    assert s.enable_log_requests and s.max_log_len == 10
    # vLLM's older spelling turns it off again (the last one wins)
    args = build_parser().parse_args(["serve", "m", "--enable-log-requests", "--disable-log-requests"])
    assert not server_settings(args).enable_log_requests


@pytest.mark.parametrize(("argv", "error"), [
    (["serve", "m", "--allowed-origins", "*"], "argument --allowed-origins: expected a JSON list of strings"),
    (["proxy", "--allowed-headers", '{"a": 1}'], "argument --allowed-headers: expected a JSON list of strings"),
    (["serve", "m", "--ssl-certfile", "/no/such.pem"], "argument --ssl-certfile: no such file: '/no/such.pem'"),
    (["proxy", "--ssl-cert-reqs", "3"], "argument --ssl-cert-reqs: expected 0 (none), 1 (optional) or 2"),
    (["proxy", "--root-path", "llm"], "argument --root-path: expected a path starting with '/'"),
    (["serve", "m", "--uvicorn-log-level", "loud"], "argument --uvicorn-log-level: invalid choice: 'loud'"),
    (["serve", "m", "--max-log-len", "-1"], "argument --max-log-len: expected a non-negative integer"),
    (["proxy", "--instance-ssl-ca-certs", "/no/ca.pem"], "argument --instance-ssl-ca-certs: no such file"),
    (["up", "standard", "m", "--ssl-keyfile", "/no/key.pem"], "argument --ssl-keyfile: no such file"),
])
def test_bad_values_name_the_flag(capsys: pytest.CaptureFixture[str], argv: list[str], error: str) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert error in capsys.readouterr().err


def test_tls_flags_that_do_not_fit_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked (and the files loaded) before anything starts: an error naming the flags, exit 2."""
    cert = self_signed(tmp_path)
    cases = [
        (["serve", "m", "--ssl-keyfile", str(cert.key)], "--ssl-keyfile: only with --ssl-certfile"),
        (["proxy", "--ssl-ca-certs", str(cert.cert), "--ssl-cert-reqs", "2"],
         "--ssl-ca-certs, --ssl-cert-reqs: only with --ssl-certfile"),
        (["serve", "m", "--ssl-certfile", str(cert.cert), "--ssl-keyfile", str(cert.key), "--ssl-cert-reqs", "1"],
         "--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs"),
        (["proxy", "--ssl-certfile", str(cert.cert)], f"--ssl-certfile {cert.cert}: cannot load the certificate"),
        (["proxy", "--instance-ssl-keyfile", str(cert.key)], "--instance-ssl-keyfile needs --instance-ssl-certfile"),
        (["proxy", "--instance-ssl-certfile", str(cert.key)], f"--instance-ssl-certfile {cert.key}: cannot load"),
        (["up", "standard", "m", "--ssl-certfile", str(cert.key)], f"--ssl-certfile {cert.key}: cannot load"),
    ]
    for argv, error in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert error in err and "Traceback" not in err, (argv, err)


def test_up_passes_the_front_end_flags_to_its_proxy(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    args = build_parser().parse_args([
        "up", "standard", "m", "--allowed-origins", '["https://a"]', "--allow-credentials",
        "--ssl-certfile", str(cert.cert), "--ssl-keyfile", str(cert.key), "--root-path", "/gw",
        "--proxy-args", "--allowed-methods '[\"GET\"]'"])
    spec = spec_from_args(args)
    assert spec.proxy_scheme == "https"
    assert spec.proxy_args == ("--allowed-origins", '["https://a"]', "--allow-credentials",
                               "--ssl-keyfile", str(cert.key), "--ssl-certfile", str(cert.cert),
                               "--root-path", "/gw", "--allowed-methods", '["GET"]')
    plain = spec_from_args(build_parser().parse_args(["up", "standard", "m"]))
    assert plain.proxy_scheme == "http" and plain.proxy_args == ()


@pytest.mark.parametrize(("proxy_args", "flag"), [
    ("--ssl-certfile c.pem --ssl-keyfile k.pem", "--ssl-certfile"),
    ("--root-path=/x --ssl-keyfile=k.pem", "--ssl-keyfile"),
    ("--root-path /x --ssl-certf c.pem", "--ssl-certf"), ("--ssl-k k.pem", "--ssl-k")])
def test_up_refuses_tls_in_proxy_args(capsys: pytest.CaptureFixture[str], proxy_args: str, flag: str) -> None:
    """The proxy's TLS inside --proxy-args would leave `up` probing it over http until the timeout."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["up", "standard", "m", f"--proxy-args={proxy_args}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --proxy-args: {flag}: " in err and "up --ssl-certfile/--ssl-keyfile" in err
    ok = build_parser().parse_args(["up", "standard", "m", "--proxy-args", "--ssl-ca-certs ca.pem --ssl-cert x"])
    assert spec_from_args(ok).proxy_args == ("--ssl-ca-certs", "ca.pem", "--ssl-cert", "x")


def _get(settings: ProxySettings, path: str, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get(path, headers=headers)

    return asyncio.run(go())


def test_proxy_cors_in_process() -> None:
    """No origin by default (vLLM's default, `["*"]`, lets any web page read): no CORS header at
    all; `--allowed-origins '["*"]'` opens it to every origin."""
    r = _get(ProxySettings(registry_port=None), "/health", {"Origin": "https://anywhere.example"})
    assert r.status_code == 503 and "access-control-allow-origin" not in r.headers
    every = ProxySettings(registry_port=None, frontend=FrontendConfig(cors=CORSConfig(allowed_origins=("*",))))
    r = _get(every, "/health", {"Origin": "https://anywhere.example"})
    assert r.status_code == 503 and r.headers["access-control-allow-origin"] == "*"


def test_route_path_drops_the_root_path() -> None:
    """uvicorn puts --root-path before the path; the proxy matches and forwards the path without it."""
    assert route_path({"path": "/gw/v1/completions", "root_path": "/gw"}) == "/v1/completions"
    assert route_path({"path": "/v1/completions", "root_path": "/gw"}) == "/v1/completions"
    assert route_path({"path": "/gwx/v1", "root_path": "/gw"}) == "/gwx/v1"
    assert route_path({"path": "/v1/models"}) == "/v1/models"


def test_an_https_instance_registers_as_https() -> None:
    """`serve --ssl-certfile --proxy-address`: request_address `https://host:port` (vLLM's plain
    `host:port` otherwise); the proxy keys it by host:port and calls it over HTTPS."""
    from pdserve.kv.messages import Register
    from pdserve.proxy.instances import InstanceTable

    table = InstanceTable(ProxySettings(mode="standard", registry_port=None))
    inst = table.register(Register(role="S", request_address="https://127.0.0.1:9001"))
    assert inst is not None and (inst.address, inst.url) == ("127.0.0.1:9001", "https://127.0.0.1:9001")
    inst = table.register(Register(role="S", request_address="127.0.0.1:9001"))  # restarted without TLS
    assert inst is not None and inst.url == "http://127.0.0.1:9001"
    static = InstanceTable(ProxySettings(mode="standard", registry_port=None, instances=("https://h:1/", "h:2")))
    assert [i.url for i in static.all()] == ["https://h:1", "http://h:2"]
