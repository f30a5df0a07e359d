"""`pdserve serve` command line: the tool-calling and chat-template flags reach the server's settings."""

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
    for name in ("mistral", "pythonic", "qwen3_coder"):
        assert _settings("--tool-call-parser", name).tool_call_parser == name
    # vLLM's flag, which its users pass along: accepted, nothing to turn on (auto is always on)
    assert _settings("--enable-auto-tool-choice", "--tool-call-parser", "hermes").tool_call_parser == "hermes"


def test_unknown_tool_call_parser_is_an_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["serve", "dummy:qwen3-tiny", "--tool-call-parser", "jamba"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tool-call-parser" in err and "'jamba'" in err and "hermes" in err


TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_chat_template_from_a_file_or_inline(tmp_path) -> None:
    """vLLM's --chat-template: a file's text, else the value itself when it is a template; the
    server's settings hold the source; --trust-request-chat-template is off by default."""
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert _settings("--chat-template", str(path)).chat_template == TEMPLATE
    assert _settings("--chat-template", TEMPLATE).chat_template == TEMPLATE
    plain = _settings()
    assert plain.chat_template is None and not plain.trust_request_chat_template
    assert _settings("--trust-request-chat-template").trust_request_chat_template


@pytest.mark.parametrize(("value", "why"), [
    ("no/such/template.jinja", "neither a file nor a Jinja template"),
    ("{% for m in messages %}unclosed", "does not compile"),
])
def test_bad_chat_template_is_an_error_naming_the_flag(
    capsys: pytest.CaptureFixture[str], value: str, why: str
) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["serve", "dummy:qwen3-tiny", "--chat-template", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --chat-template" in err and why in err
