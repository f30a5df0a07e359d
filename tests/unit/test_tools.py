"""Tool calls in the Hermes format: parsing a reply, holding back a call's start while streaming,
the grammar of tool_choice "required" / named, and the chat template rendering tools and turns."""

from __future__ import annotations

import json

import pytest

from pdserve.model.tokenizer import Tokenizer
from pdserve.server.protocol import ChatCompletionRequest
from pdserve.server.tools import ToolStream, parse_tool_calls, template_tools, tool_constraint

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_parse_calls_and_content() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check." and [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].id != calls[1].id
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])  # malformed: left as content
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name


def test_stream_holds_back_what_may_start_a_call() -> None:
    s = ToolStream()
    assert s.push("Sure") == "Sure"
    assert s.push(" <tool") == " "  # "<tool" may be the start of "<tool_call>"
    assert s.push("_call>\n{\"name\": \"get_time\"") == ""
    assert s.push(', "arguments": {}}\n</tool_call>') == ""
    rest, calls = s.finish()
    assert rest == "" and [c.function.name for c in calls] == ["get_time"]
    s = ToolStream()
    assert s.push("a <to") == "a "
    assert s.push("o late") == "<too late"  # not a call after all: released
    assert s.finish() == ("", [])


def test_constraint_only_for_required_or_named() -> None:
    assert tool_constraint(_req(tools=[WEATHER])) is None  # auto
    assert tool_constraint(_req(tools=[WEATHER], tool_choice="none")) is None
    assert template_tools(_req(tools=[WEATHER], tool_choice="none")) is None
    required = tool_constraint(_req(tools=[WEATHER, CLOCK], tool_choice="required"))
    assert required is not None and required.grammar is not None
    assert "get_weather" in required.grammar and "get_time" in required.grammar and '("\\n" call)*' in required.grammar
    pick = {"type": "function", "function": {"name": "get_time"}}
    named = tool_constraint(_req(tools=[WEATHER, CLOCK], tool_choice=pick))
    assert named is not None and named.grammar is not None and "get_weather" not in named.grammar


@pytest.mark.parametrize("bad", [
    {"tool_choice": "required"},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tools": [WEATHER, WEATHER]},
    {"tools": [{"type": "function", "function": {"name": "has space"}}]},
])
def test_bad_tool_requests(bad: dict) -> None:
    with pytest.raises(ValueError):
        _req(**bad)


def test_template_renders_tools_calls_and_results() -> None:
    tok = Tokenizer.byte_level(512)
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert plain == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # no tools: ChatML as before
    text = tok.apply_chat_template([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"t": 20}'},
    ], tools=[WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and text.count("<|im_start|>system") == 1
    assert json.dumps(WEATHER) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>\n{"t": 20}\n</tool_response><|im_end|>' in text
