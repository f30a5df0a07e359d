"""Bad command-line values are usage errors naming the flag, not tracebacks or silent surprises."""

from __future__ import annotations

import pytest
import torch

from pdserve.cli import build_parser, main


@pytest.mark.parametrize("argv", [
    ["serve", "dummy:qwen3-tiny", "--port", "70000"],  # uvicorn bound 70000 - 65536 = 4464
    ["serve", "dummy:qwen3-tiny", "--port", "-1"],
    ["serve", "dummy:qwen3-tiny", "--kv-handshake-port", "65536"],
    ["serve", "dummy:qwen3-tiny", "--kv-notify-port", "-2"],
    ["proxy", "--port", "-1"],  # uvicorn: "Servname not supported for ai_socktype"
    ["proxy", "--registry-port", "70000"],
    ["up", "disagg", "dummy:qwen3-tiny", "--port", "99999"],
])
def test_out_of_range_port_names_the_flag(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    flag = next(a for a in argv if a.endswith("port"))
    assert f"argument {flag}: expected a port (0-65535)" in capsys.readouterr().err


def test_ports_in_range_parse() -> None:
    args = build_parser().parse_args(["serve", "dummy:qwen3-tiny", "--port", "0", "--kv-notify-port", "65535"])
    assert (args.port, args.kv_notify_port) == (0, 65535)


def test_cores_this_machine_lacks_name_cpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "dummy:qwen3-tiny", "--prompt", "x", "--cpus", "4095"]) == 2
    assert "--cpus 4095: cannot pin to those cores" in capsys.readouterr().err


@pytest.mark.parametrize(("device", "why"), [
    ("gpu", "--device 'gpu': expected cpu or cuda[:N]"),
    pytest.param("cuda", "sees no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a CUDA device is here")),
])
def test_unusable_device_names_the_flag(capsys: pytest.CaptureFixture[str], device: str, why: str) -> None:
    assert main(["generate", "dummy:qwen3-tiny", "--prompt", "x", "--device", device]) == 2
    assert why in capsys.readouterr().err


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://h:1"])
def test_bench_base_url_without_http_names_the_flag(capsys: pytest.CaptureFixture[str], url: str) -> None:
    """Before: accepted, and the run failed at its first request with aiohttp's NonHttpUrlClientError."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "--base-url", url])
    assert e.value.code == 2
    assert "argument --base-url: expected http://HOST:PORT" in capsys.readouterr().err
