"""The `mistral`, `pythonic` and `qwen3_coder` tool-call formats: each parser on hand-written
replies, its stream on every split of them (the joined deltas must equal the finished parse),
the grammar of tool_choice "required" / named in each format (what it allows parses back to the
calls), and the chat / responses paths in-process over a dummy model constrained to each format."""

from __future__ import annotations

import asyncio
import json
import random
import re

import httpx
import llguidance as llg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.sampling_params import StructuredOutputs
from pdserve.engine.structured import grammar_of
from pdserve.model.tokenizer import Tokenizer
from pdserve.server.app import build_app
from pdserve.server.chat import chat_inputs
from pdserve.server.context import ServerContext
from pdserve.server.protocol import ChatCompletionRequest, DeltaToolCall, FunctionDef
from pdserve.server.settings import ServerSettings
from pdserve.server.tool_parsers import ToolParser, make_tool_parser
from pdserve.server.tool_parsers.arg_grammar import params_of
from pdserve.server.tools import tool_constraint, tool_functions

MISTRAL, PYTHONIC, QWEN = (make_tool_parser(n) for n in ("mistral", "pythonic", "qwen3_coder"))
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "where": {"type": "object"}, "tags": {"type": "array"}, "ratio": {"type": "number"},
        "note": {"type": ["string", "null"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
FUNCTIONS = [FunctionDef.model_validate(t["function"]) for t in (WEATHER, CLOCK)]
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
NOW = '{"name": "get_time", "arguments": {}}'

Call = tuple[str, object]  # (name, the arguments' JSON parsed)
Case = tuple[str, "str | None", list[Call]]  # (text, content of the finished parse, calls)
MISTRAL_REPLIES: list[Case] = [
    (f"Let me check. [TOOL_CALLS][{PARIS}, {NOW}]", "Let me check.",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('Sure.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', "Sure.",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}", None, [("get_time", {})]),
    (f"[TOOL_CALLS] {PARIS}", None, [("get_weather", {"city": "Paris"})]),
    ("plain [TOOLS] text", "plain [TOOLS] text", []),
    ("a [TOOL_CA", "a [TOOL_CA", []),  # a partial marker at the end: content after all
    ('[TOOL_CALLS][{"name": 5}]', '[TOOL_CALLS][{"name": 5}]', []),
    (f"[TOOL_CALLS] oops [TOOL_CALLS][{NOW}]", "[TOOL_CALLS] oops", [("get_time", {})]),
    ('x [TOOL_CALLS][{"name": "get_ti', 'x [TOOL_CALLS][{"name": "get_ti', []),  # cut off
    (f'[TOOL_CALLS][{PARIS}, {{"name"', None, [("get_weather", {"city": "Paris"})]),
    (f"[TOOL_CALLS][{NOW}] and more", None, [("get_time", {})]),
    (f"[TOOL_CALLS][{NOW}, 7]", None, [("get_time", {})]),
    ("[TOOL_CALLS]f[ARGS][1]", "[TOOL_CALLS]f[ARGS][1]", []),  # arguments not an object
    ('[TOOL_CALLS]get_weather {"city": 1}', '[TOOL_CALLS]get_weather {"city": 1}', []),
    ('[TOOL_CALLS][{"name": "f", "arguments": "{\\"a\\": 1}"}]', None, [("f", {"a": 1})]),
    ('[TOOL_CALLS]f[ARGS]{"s": "}[TOOL_CALLS]"}', None, [("f", {"s": "}[TOOL_CALLS]"})]),
    ("[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ("[TOOL_CALLS]", "[TOOL_CALLS]", []),
    ("", "", []),
]
PYTHONIC_REPLIES: list[Case] = [
    ("[get_weather(city=\"Paris\", days=3), get_time()]", None,
     [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]),
    ("<|python_start|>[get_time()]<|python_end|>", None, [("get_time", {})]),
    (' \n[f(a=[1, -2.5, {"k": None, "t": (True, False)}], b=true, c=null)]', None,
     [("f", {"a": [1, -2.5, {"k": None, "t": [True, False]}], "b": True, "c": None})]),
    ("[f(s=\"a, b]) \\\" 'q'\", t='''x\"\"\"y''', u=\"\"\"z'''\"\"\")]", None,
     [("f", {"s": "a, b]) \" 'q'", "t": 'x"""y', "u": "z'''"})]),
    ("[a.b.c(x=1)]", None, [("a.b.c", {"x": 1})]),
    ("The answer is [1, 2].", "The answer is [1, 2].", []),
    ("[1, 2]", "[1, 2]", []),
    ("[f(x)]", "[f(x)]", []),  # positional: not a call of ours
    ('[f(x=__import__("os").system("echo"))]', '[f(x=__import__("os").system("echo"))]', []),  # never evaluated
    ("[f(**kw)]", "[f(**kw)]", []),
    ("[f(x=1e999)]", "[f(x=1e999)]", []),  # not a finite number
    ('[f(x=b"raw")]', '[f(x=b"raw")]', []),
    ("[f(x={1: 2})]", "[f(x={1: 2})]", []),
    ("[f(x=1), g(y=open('f'))]", None, [("f", {"x": 1})]),
    ("[f(x=1)] trailing words", None, [("f", {"x": 1})]),
    ("[f(x=1", "[f(x=1", []),  # cut off
    ("[f(x=1), g(y=", None, [("f", {"x": 1})]),
    ("[f())", "[f())", []),
    ("[Note: see (below)]", "[Note: see (below)]", []),
    ("[]", "[]", []),
    ("<|python", "<|python", []),
    ("", "", []),
]
_W = "<tool_call>\n<function=get_weather>\n"
_END = "</function>\n</tool_call>"
QWEN_REPLIES: list[Case] = [
    (f"Let me check.\n{_W}<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n{_END}\n"
     f"<tool_call>\n<function=get_time>\n{_END}", "Let me check.",
     [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]),
    (f"{_W}<parameter=city>\n12\n</parameter>\n<parameter=metric>\nFalse\n</parameter>\n<parameter=where>\n"
     f"{{'lat': 1.5}}\n</parameter>\n<parameter=tags>\n[\"a\", 2]\n</parameter>\n<parameter=ratio>\n2\n</parameter>\n"
     f"<parameter=note>\nnull\n</parameter>\n<parameter=extra>\n5\n</parameter>\n{_END}", None,
     [("get_weather", {"city": "12", "metric": False, "where": {"lat": 1.5}, "tags": ["a", 2], "ratio": 2,
                       "note": None, "extra": "5"})]),
    (f"{_W}<parameter=city>\n NULL \n</parameter>\n<parameter=days>\nNull\n</parameter>\n"  # null: any type, as vLLM
     f"<parameter=extra>\nnull\n</parameter>\n<parameter=tags>\nnullish\n</parameter>\n{_END}", None,
     [("get_weather", {"city": None, "days": None, "extra": None, "tags": "nullish"})]),
    (f"{_W}<parameter=city>\n  def f():\n      return 1\n\n</parameter>\n{_END}", None,
     [("get_weather", {"city": "  def f():\n      return 1\n"})]),
    (f"{_W}<parameter=days>\nthree\n</parameter>\n<parameter=ratio>\nNaN\n</parameter>\n"
     f"<parameter=days>\n4.0\n</parameter>\n{_END}", None, [("get_weather", {"days": 4, "ratio": "NaN"})]),
    (f"{_W}<parameter=city>\nParis\n<parameter=days>\n2\n{_END}", None,  # missing </parameter>
     [("get_weather", {"city": "Paris", "days": 2})]),
    ("<tool_call>\n<function=other>\n<parameter=n>\n1\n</parameter>\n</function>\n</tool_call>", None,
     [("other", {"n": "1"})]),  # an unknown function: its values stay strings
    (f"{_W}junk<parameter=city>\nParis\n</parameter>\n{_END}",
     f"{_W}junk<parameter=city>\nParis\n</parameter>\n{_END}", []),
    ('<tool_call>\n{"name": "get_time"}\n</tool_call>', '<tool_call>\n{"name": "get_time"}\n</tool_call>', []),
    (f"Sure.\n{_W}<parameter=city>\nPar", f"Sure.\n{_W}<parameter=city>\nPar", []),  # cut off
    ("a <tool_c", "a <tool_c", []),
    ("no calls", "no calls", []),
]
CASES = ([(MISTRAL, *r) for r in MISTRAL_REPLIES] + [(PYTHONIC, *r) for r in PYTHONIC_REPLIES]
         + [(QWEN, *r) for r in QWEN_REPLIES])
IDS = [f"{p.name}-{i}" for i, (p, *_) in enumerate(CASES)]


def _splits(text: str) -> list[list[str]]:
    """Every cut into two pieces, single characters, and a few random chunkings."""
    rng = random.Random(len(text))
    out = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for _ in range(10):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 4)))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def _streamed(parser: ToolParser, pieces: list[str]) -> tuple[str, list[DeltaToolCall]]:
    """(content, call deltas) of `pieces` pushed one by one; no content may follow a call."""
    stream, content, deltas = parser.stream(FUNCTIONS), "", []
    for piece in [*pieces, None]:
        out = stream.push(piece) if piece is not None else stream.finish()
        assert not (out.content and deltas), "content after a call"
        content += out.content
        deltas += out.calls
    return content, deltas


def _id_ok(parser: ToolParser, call_id: str) -> bool:
    """Mistral's templates take 9 letters and digits only; the others get chat's ids."""
    if parser.name == "mistral":
        return re.fullmatch(r"[A-Za-z0-9]{9}", call_id) is not None
    return call_id.startswith("chatcmpl-tool-")


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=IDS)
def test_parse_finished_reply(parser: ToolParser, text: str, content: str | None, calls: list[Call]) -> None:
    reply = parser.parse(text, FUNCTIONS)
    assert reply.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.calls] == calls
    assert len({c.id for c in reply.calls}) == len(calls) and all(_id_ok(parser, c.id) for c in reply.calls)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=IDS)
def test_every_split_streams_the_finished_parse(parser: ToolParser, text: str, content: str | None,
                                                 calls: list[Call]) -> None:
    """Whatever the deltas, the joined content and the calls (each whole in one delta, in index
    order) are the finished reply's, string for string: no part of a call, its start marker split
    across deltas included, ever goes out as content."""
    reply = parser.parse(text, FUNCTIONS)
    expected = [(c.function.name, c.function.arguments) for c in reply.calls]
    for pieces in _splits(text):
        got, deltas = _streamed(parser, pieces)
        assert got == (reply.content or ""), pieces
        assert [d.index for d in deltas] == list(range(len(calls)))
        assert [(d.function.name, d.function.arguments) for d in deltas] == expected, pieces
        assert all(_id_ok(parser, d.id) and d.type == "function" for d in deltas)


_V11 = '[TOOL_CALLS]get_time[ARGS]{}[TOOL_CALLS]get_time[ARGS]{"a": 1}'
_PY = '[get_time(), get_weather(city="Paris")]'


@pytest.mark.parametrize(("parser", "text", "ends"), [
    (MISTRAL, f"[TOOL_CALLS][{PARIS}, {NOW}]", [len(f"[TOOL_CALLS][{PARIS}"), len(f"[TOOL_CALLS][{PARIS}, {NOW}")]),
    (MISTRAL, _V11, [len("[TOOL_CALLS]get_time[ARGS]{}"), len(_V11)]),
    (PYTHONIC, _PY, [len("[get_time(),"), len(_PY)]),
    (QWEN, f"{_W}{_END}\n{_W}{_END}", [len(_W + _END), len(f"{_W}{_END}\n{_W}{_END}")]),
])
def test_each_call_goes_out_as_soon_as_it_is_complete(parser: ToolParser, text: str, ends: list[int]) -> None:
    """Fed a character at a time, call j comes out with the character that settles it (the end
    of its object, block, or the `,` / `]` after a Python call), not a character earlier."""
    stream, when = parser.stream(FUNCTIONS), []
    for n, c in enumerate(text, start=1):
        when += [n] * len(stream.push(c).calls)
    assert when == ends and not stream.finish().calls


def test_content_holds_back_only_what_may_start_a_call() -> None:
    s = MISTRAL.stream()
    assert s.push("Sure").content == "Sure"
    assert s.push(" [TOOL_").content == ""  # maybe the marker (and the blank before it)
    assert s.push("CALLS][").content == ""
    out = s.push(f"{NOW}]")
    assert out.content == "" and [c.function.name for c in out.calls] == ["get_time"]
    s = MISTRAL.stream()
    assert s.push("a [TOOL").content == "a"
    assert s.push("S]").content == " [TOOLS]"  # not the marker after all: released
    s = PYTHONIC.stream()
    assert s.push(" [get_weat").content == ""  # maybe a list of calls
    assert s.push("her is fine]").content == " [get_weather is fine]"  # decided before the list ends
    s = PYTHONIC.stream()
    assert s.push("Sunny").content == "Sunny"  # not a list: content at once
    s = QWEN.stream(FUNCTIONS)
    assert s.push("Ok <tool_").content == "Ok"
    assert s.push("call>\n<function=get_time>\n</function>\n</tool_call>").calls


def test_pythonic_text_after_the_list_is_dropped_not_content() -> None:
    """pythonic.py's departure from vLLM's unstreamed parse (which makes this reply all content):
    the call is out with the `]`, before the text after it arrives, so both modes keep it."""
    s = PYTHONIC.stream(FUNCTIONS)
    assert [c.function.name for c in s.push("[get_time()]").calls] == ["get_time"]
    assert s.push(" trailing words").content == "" and s.finish().content == ""
    reply = PYTHONIC.parse("[get_time()] trailing words", FUNCTIONS)
    assert reply.content is None and [c.function.name for c in reply.calls] == ["get_time"]


def _pieces_strategy(pieces: list[str]) -> st.SearchStrategy[tuple[str, list[int]]]:
    return st.tuples(st.lists(st.sampled_from(pieces), max_size=10).map("".join),
                     st.lists(st.integers(0, 300), max_size=5))


FUZZ_PIECES = {
    "mistral": ["[TOOL_CALLS]", "[TOOL_", "[ARGS]", "[CALL_ID]", "ab1", "get_time", "[", "]", "{", "}", ",", " ",
                '"', "\\", PARIS, NOW, '{"a": 1}', "x"],
    "pythonic": ["[", "]", "(", ")", ",", "=", '"', "'", '"""', "f", "x", "1", "<|python_start|>", "get_time()",
                 'get_weather(city="Paris")', " ", "\\", ".", "None"],
    "qwen3_coder": ["<tool_call>", "</tool_call>", "<tool_", "<function=get_weather>", "<function=get_time>",
                    "</function>", "<parameter=city>", "<parameter=days>", "</parameter>", "\n", "3", "Paris", " "],
}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(FUZZ_PIECES)))
def test_any_text_any_split_streams_the_finished_parse(data: st.DataObject, name: str) -> None:
    parser = make_tool_parser(name)
    text, cuts = data.draw(_pieces_strategy(FUZZ_PIECES[name]))
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    reply = parser.parse(text, FUNCTIONS)
    content, deltas = _streamed(parser, pieces)
    assert content == (reply.content or "")
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c.function.name, c.function.arguments) for c in reply.calls]
    assert reply.content == text or reply.calls  # no calls: all of it is content
    assert all(isinstance(json.loads(d.function.arguments), dict) for d in deltas)


def _req(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def _allows(grammar: str, text: str) -> bool:
    """The grammar accepts exactly `text` (byte-level tokens) as a whole output."""
    tok = Tokenizer.byte_level(512)
    lltok = llg.LLTokenizer(tok.hf.to_str(), n_vocab=512, eos_token=list(tok.eos_token_ids), slices=None)
    matcher = llg.LLMatcher(lltok, grammar_of(StructuredOutputs(grammar=grammar)))
    return matcher.consume_tokens(tok.encode(text)) and matcher.is_accepting()


_PW = '{"city":"Paris","days":3}'
GRAMMAR_CASES = [  # (parser, one call, two calls, the get_time call alone, a call against the schema)
    (MISTRAL, f"[TOOL_CALLS]get_weather[ARGS]{_PW}",
     f"[TOOL_CALLS]get_weather[ARGS]{_PW}[TOOL_CALLS]get_time[ARGS]{{}}", "[TOOL_CALLS]get_time[ARGS]{}",
     '[TOOL_CALLS]get_weather[ARGS]{"days":3}'),
    (MISTRAL, f'[TOOL_CALLS][{{"name":"get_weather","arguments":{_PW}}}]',
     f'[TOOL_CALLS][{{"name":"get_weather","arguments":{_PW}}}, {{"name":"get_time","arguments":{{}}}}]',
     '[TOOL_CALLS][{"name":"get_time","arguments":{}}]', '[TOOL_CALLS][{"name":"get_weather","arguments":{}}]'),
    (PYTHONIC, '[get_weather(city="Paris", days=3, note=null)]', '[get_weather(city="Paris", metric=true), get_time()]',
     "[get_time()]", '[get_weather(city="Paris", days="3")]'),
    (QWEN, f"{_W}<parameter=city>\nNew\nYork </p>\n</parameter>\n<parameter=days>\n3\n</parameter>\n{_END}",
     f"{_W}<parameter=city>\nParis\n</parameter>\n{_END}\n<tool_call>\n<function=get_time>\n{_END}",
     f"<tool_call>\n<function=get_time>\n{_END}", f"{_W}<parameter=days>\n3\n</parameter>\n{_END}"),
]


@pytest.mark.parametrize(("parser", "one", "two", "clock", "bad"), GRAMMAR_CASES,
                         ids=[f"{c[0].name}-{i}" for i, c in enumerate(GRAMMAR_CASES)])
def test_constraint_grammar_allows_calls_the_parser_reads(parser: ToolParser, one: str, two: str, clock: str,
                                                          bad: str) -> None:
    assert tool_constraint(_req(tools=[WEATHER]), parser) is None  # auto
    required = tool_constraint(_req(tools=[WEATHER, CLOCK], tool_choice="required"), parser)
    assert required is not None and required.grammar is not None
    assert _allows(required.grammar, one) and _allows(required.grammar, two)
    assert not _allows(required.grammar, "Sure. " + one) and not _allows(required.grammar, bad)
    single = tool_constraint(_req(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False), parser)
    assert single is not None and single.grammar is not None
    assert _allows(single.grammar, one) and not _allows(single.grammar, two)
    named = tool_constraint(_req(tools=[WEATHER, CLOCK], tool_choice={"type": "function",
                                                                      "function": {"name": "get_time"}}), parser)
    assert named is not None and named.grammar is not None and "get_weather" not in named.grammar
    assert _allows(named.grammar, clock) and not _allows(named.grammar, one)
    for text in (one, two, clock):
        reply = parser.parse(text, FUNCTIONS)
        assert reply.content is None and reply.calls
    weather = json.loads(parser.parse(one, FUNCTIONS).calls[0].function.arguments)
    assert weather["city"] in ("Paris", "New\nYork </p>") and weather.get("days") == 3


# The chat and responses paths over a dummy model whose reply the constraint shapes into calls.
MODEL = "dummy:qwen3-tiny"
ALARM = {"type": "function", "function": {"name": "set_alarm", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["tz", "loud"],
    "properties": {"tz": {"enum": ["UTC", "CET"]}, "loud": {"type": "boolean"}}}}}


def _post(ctx: ServerContext, path: str, body: dict) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post(path, json=body)

    return asyncio.run(go())


@pytest.mark.parametrize("name", ["mistral", "pythonic", "qwen3_coder"])
def test_chat_named_tool_choice_streamed_or_not(engine: AsyncEngine, name: str) -> None:
    """A named choice constrains the reply to a call in the server's format; it comes back as
    tool_calls with its arguments typed by the schema, the same call streamed (the same seed)."""
    ctx = ServerContext(engine, ServerSettings(served_model_names=(MODEL,), tool_call_parser=name))
    body = {"messages": [{"role": "user", "content": "wake me"}], "tools": [ALARM], "max_tokens": 300,
            "tool_choice": {"type": "function", "function": {"name": "set_alarm"}}, "temperature": 1.0, "seed": 3}
    choice = _post(ctx, "/v1/chat/completions", body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"]
    (call,) = choice["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "set_alarm" and args["tz"] in ("UTC", "CET") and isinstance(args["loud"], bool)
    assert _id_ok(make_tool_parser(name), call["id"])
    events = [json.loads(line[6:]) for line in _post(ctx, "/v1/chat/completions", {**body, "stream": True}).text
              .split("\n\n") if line.startswith("data: {")]
    deltas = [t for e in events for t in e["choices"][0]["delta"].get("tool_calls") or []]
    assert [(t["function"]["name"], t["function"]["arguments"]) for t in deltas] == [
        ("set_alarm", call["function"]["arguments"])]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == ""
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_responses_reads_calls_against_the_tools(engine: AsyncEngine) -> None:
    """/v1/responses parses with the request's tools too (qwen3_coder types values by them)."""
    ctx = ServerContext(engine, ServerSettings(served_model_names=(MODEL,), tool_call_parser="qwen3_coder"))
    tool = {"type": "function", **ALARM["function"]}
    body = {"input": "wake me", "tools": [tool], "tool_choice": "required", "max_output_tokens": 300,
            "temperature": 1.0, "store": False}
    out = _post(ctx, "/v1/responses", body).json()["output"]
    calls = [o for o in out if o["type"] == "function_call"]
    assert calls and all(isinstance(json.loads(c["arguments"])["loud"], bool) for c in calls)


def test_tool_functions_and_chat_keep_mistral_marker(engine: AsyncEngine) -> None:
    """Mistral's marker is a special token: requests with tools decode with skip_special_tokens
    off (as vLLM's parser does); tool_choice "none" leaves it as asked."""
    assert [f.name for f in tool_functions(_req(tools=[WEATHER, CLOCK]))] == ["get_weather", "get_time"]
    assert MISTRAL.needs_special_tokens and not PYTHONIC.needs_special_tokens and not QWEN.needs_special_tokens
    ctx = ServerContext(engine, ServerSettings(served_model_names=(MODEL,), tool_call_parser="mistral"))
    with_tools = asyncio.run(chat_inputs(ctx, _req(tools=[WEATHER])))
    without = asyncio.run(chat_inputs(ctx, _req(tools=[WEATHER], tool_choice="none")))
    assert not with_tools.params.skip_special_tokens and without.params.skip_special_tokens


@pytest.mark.parametrize("name", ["pythonic", "qwen3_coder"])
def test_required_that_is_not_a_list_of_names_is_not_a_500(engine: AsyncEngine, name: str) -> None:
    """A schema's `required` holding something other than names (a list, an object) lists none of
    the parameters: the formats that read the schema (qwen3_coder's stream, the per-argument
    grammars of "required") answer, instead of failing on an unhashable item (a 500)."""
    odd = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": [["a"], {"b": 1}, "a"]}}}
    ctx = ServerContext(engine, ServerSettings(served_model_names=(MODEL,), tool_call_parser=name))
    for choice in ("auto", "required"):
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": [odd], "tool_choice": choice,
                "max_tokens": 40, "temperature": 0}
        r = _post(ctx, "/v1/chat/completions", body)
        assert r.status_code == 200, (choice, r.text)
    (param,) = params_of(FunctionDef.model_validate(odd["function"]))
    assert param.required  # "a", named as a string, is still required
