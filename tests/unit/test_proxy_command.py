"""`pdserve proxy` command line: defaults, settings, and that the proxy stays light (no torch)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pdserve.config import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_REGISTRY_PORT
from pdserve.proxy.command import add_parser, settings_from_args


def _settings(*argv: str):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return settings_from_args(parser.parse_args(["proxy", *argv]))


def test_defaults() -> None:
    s = _settings()
    assert (s.host, s.port, s.registry_host, s.registry_port) == (
        DEFAULT_HOST, DEFAULT_PORT, DEFAULT_HOST, DEFAULT_REGISTRY_PORT)
    assert (s.mode, s.kv_mode, s.routing, s.fallback) == ("disagg", "READ", "round-robin", "local-prefill")
    assert s.heartbeat_timeout_s == 3.0 and s.prefill_timeout_s is None and s.api_key is None


def test_options() -> None:
    s = _settings("--host", "0.0.0.0", "--kv-mode", "write", "--prefill", "http://a:1", "http://b:2",
                  "--decode", "c:3", "--routing", "least-loaded", "--fallback", "fail", "--prefill-timeout", "5",
                  "--registry-token", "t", "--api-key", "k", "--instance-api-key", "ik", "--heartbeat-timeout", "1.5",
                  "--max-body-bytes", "1000")
    assert s.registry_host == "0.0.0.0" and s.kv_mode == "WRITE"
    assert s.prefill == ("http://a:1", "http://b:2") and s.decode == ("c:3",)
    assert (s.routing, s.fallback, s.prefill_timeout_s, s.registry_token) == ("least-loaded", "fail", 5.0, "t")
    assert (s.api_key, s.instance_api_key, s.heartbeat_timeout_s, s.max_body_bytes) == ("k", "ik", 1.5, 1000)
    assert _settings("--no-registry").registry_port is None
    standard = _settings("--mode", "standard", "--instance", "http://a:1", "--instance", "http://b:2")
    assert standard.instances == ("http://a:1", "http://b:2")


@pytest.mark.parametrize("argv", [["--heartbeat-timeout", "0"], ["--prefill-timeout", "-1"],
                                  ["--max-body-bytes", "0"]])
def test_bad_values(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        _settings(*argv)


def test_bad_instance_url_is_a_clear_error() -> None:
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "proxy", "--decode", "localhost"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "expected host:port" in result.stderr


def test_the_proxy_does_not_import_torch() -> None:
    code = ("import sys; import pdserve.proxy.app, pdserve.proxy.command, pdserve.cli; "
            "pdserve.proxy.app.build_app(pdserve.proxy.settings.ProxySettings()); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
