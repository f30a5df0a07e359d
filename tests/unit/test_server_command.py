"""`pdserve serve` command line: the tool-calling flags reach the server's settings."""

from __future__ import annotations

import argparse

import pytest

from pdserve.server.command import add_parser, settings_from_args
from pdserve.server.settings import ServerSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser


def _settings(*argv: str) -> ServerSettings:
    return settings_from_args(_parser().parse_args(["serve", "dummy:qwen3-tiny", *argv]))


def test_tool_call_parser() -> None:
    assert _settings().tool_call_parser == "hermes"
    assert _settings("--tool-call-parser", "llama3_json").tool_call_parser == "llama3_json"
    # vLLM's flag, which its users pass along: accepted, nothing to turn on (auto is always on)
    assert _settings("--enable-auto-tool-choice", "--tool-call-parser", "hermes").tool_call_parser == "hermes"


def test_unknown_tool_call_parser_is_an_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["serve", "dummy:qwen3-tiny", "--tool-call-parser", "mistral"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tool-call-parser" in err and "'mistral'" in err and "hermes" in err
