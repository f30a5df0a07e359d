"""Tool calls: each format's parser on finished replies, its stream on every split of them (the
joined deltas must equal the finished parse), the grammar of tool_choice "required" / named in each
format (what it allows parses back to the calls), and the chat template rendering tools and turns."""

from __future__ import annotations

import json
import random

import llguidance as llg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.sampling_params import StructuredOutputs
from pdserve.engine.structured import grammar_of
from pdserve.model.tokenizer import Tokenizer
from pdserve.server.protocol import ChatCompletionRequest, DeltaToolCall
from pdserve.server.reasoning import ReasoningStream, split_reasoning
from pdserve.server.reply import ReplyFilter
from pdserve.server.tool_parsers import TOOL_PARSERS, ToolParser, make_tool_parser
from pdserve.server.tools import template_tools, tool_constraint

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
HERMES, LLAMA = make_tool_parser("hermes"), make_tool_parser("llama3_json")
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
NOW = '{"name": "get_time", "arguments": {}}'

Call = tuple[str, object]  # (name, the arguments' JSON parsed)
# (text, content of the finished parse, calls)
HERMES_REPLIES: list[tuple[str, str | None, list[Call]]] = [
    (f"Let me check.\n<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{NOW}\n</tool_call>", "Let me check.",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("no calls here", "no calls here", []),
    ("trailing blanks stay  \n", "trailing blanks stay  \n", []),
    ("a <to", "a <to", []),  # a partial marker at the end: content after all
    ("a <tool_call> never closed", "a <tool_call> never closed", []),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     []),  # arguments not an object
    (f"\n\n<tool_call>{NOW}</tool_call>", None, [("get_time", {})]),
    (f"A <tool_call>bad</tool_call>  \n<tool_call>{NOW}</tool_call> after <tool_call>bad</tool_call> x",
     "A <tool_call>bad</tool_call>", [("get_time", {})]),  # malformed before the first call: content
    (f"Sure.\n<tool_call>\n{PARIS[:30]}", f"Sure.\n<tool_call>\n{PARIS[:30]}", []),  # cut off
    (f"<tool_call>{PARIS}</tool_call>\n<tool_call>{NOW[:20]}", None, [("get_weather", {"city": "Paris"})]),
    (f"<tool_call> x <tool_call>{NOW}</tool_call>", f"<tool_call> x <tool_call>{NOW}</tool_call>", []),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", {"a": 1})]),
    ('<tool_call>{"name": "f", "arguments": {"s": "Zürich </tool_call"}}</tool_call>', None,
     [("f", {"s": "Zürich </tool_call"})]),
    ('x {"name": "f"} <tool_call>{"name": "f"}</tool_call>', 'x {"name": "f"}', [("f", {})]),
]
LL_PARIS = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_REPLIES: list[tuple[str, str | None, list[Call]]] = [
    (LL_PARIS, None, [("get_weather", {"city": "Paris"})]),
    (f'<|python_tag|>{LL_PARIS}; {{"name": "get_time", "arguments": {{}}}}', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    (f' \n<|python_tag|> {LL_PARIS}\n{LL_PARIS}', None, [("get_weather", {"city": "Paris"})] * 2),
    ('{"name": "f", "parameters": {"s": "a}b{\\"c"}}', None, [("f", {"s": 'a}b{"c'})]),
    ("The weather is fine.", "The weather is fine.", []),
    ('{"answer": 4}', '{"answer": 4}', []),  # JSON, not a call
    ('{"name": f}', '{"name": f}', []),
    (f"{LL_PARIS} and then text", None, [("get_weather", {"city": "Paris"})]),
    (f'{LL_PARIS};;{LL_PARIS}', None, [("get_weather", {"city": "Paris"})]),
    (f'{LL_PARIS}}}', None, [("get_weather", {"city": "Paris"})]),
    (LL_PARIS[:25], LL_PARIS[:25], []),  # cut off
    (f'{LL_PARIS}; {LL_PARIS[:25]}', None, [("get_weather", {"city": "Paris"})]),
    ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("<|python", "<|python", []),
    ("  ", "  ", []),
    ("", "", []),
    (f"<|python_tag|><|python_tag|>{LL_PARIS}", f"<|python_tag|><|python_tag|>{LL_PARIS}", []),
    ('{"name": "f"}', None, [("f", {})]),
]
CASES = [(HERMES, *r) for r in HERMES_REPLIES] + [(LLAMA, *r) for r in LLAMA_REPLIES]
IDS = [f"{p.name}-{i}" for i, (p, *_) in enumerate(CASES)]


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def _splits(text: str) -> list[list[str]]:
    """Every cut into two pieces, single characters, and a few random chunkings."""
    rng = random.Random(len(text))
    out = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 4)))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def _streamed(parser: ToolParser, pieces: list[str]) -> tuple[str, list[DeltaToolCall], list[int]]:
    """(content, call deltas, for each call the number of pieces pushed when it came out)."""
    stream, content, deltas, when = parser.stream(), "", [], []
    for n, piece in enumerate([*pieces, None], start=1):
        out = stream.push(piece) if piece is not None else stream.finish()
        if out.content:
            assert not deltas, "content after a call"
        content += out.content
        deltas += out.calls
        when += [n] * len(out.calls)
    return content, deltas, when


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=IDS)
def test_parse_finished_reply(parser: ToolParser, text: str, content: str | None, calls: list[Call]) -> None:
    reply = parser.parse(text)
    assert reply.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.calls] == calls
    assert len({c.id for c in reply.calls}) == len(calls) and all(c.type == "function" for c in reply.calls)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES, ids=IDS)
def test_every_split_streams_the_finished_parse(parser: ToolParser, text: str, content: str | None,
                                                 calls: list[Call]) -> None:
    """Whatever the deltas, the joined content and the calls (in index order, each whole in its
    first delta: id, type, name and complete arguments) are the finished reply's, string for string."""
    reply = parser.parse(text)
    expected = [(c.function.name, c.function.arguments) for c in reply.calls]
    for pieces in _splits(text):
        got, deltas, _ = _streamed(parser, pieces)
        assert got == (reply.content or ""), pieces
        assert [d.index for d in deltas] == list(range(len(calls)))
        assert [(d.function.name, d.function.arguments) for d in deltas] == expected, pieces
        assert all(d.id.startswith("chatcmpl-tool-") and d.type == "function" for d in deltas)


@pytest.mark.parametrize(("parser", "text"), [
    (HERMES, f"Hi.\n<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{NOW}\n</tool_call>"),
    (LLAMA, f'{LL_PARIS}; {{"name": "get_time", "parameters": {{}}}}'),
])
def test_each_call_goes_out_as_soon_as_it_is_complete(parser: ToolParser, text: str) -> None:
    """Fed a character at a time, call j comes out with the character that completes it, long
    before the reply ends, and not a character earlier."""
    _, deltas, when = _streamed(parser, list(text))
    ends = [text.index("</tool_call>") + 12, len(text)] if parser is HERMES else [len(LL_PARIS), len(text)]
    assert [d.function.name for d in deltas] == ["get_weather", "get_time"] and when == ends


PIECES = ["<tool_call>", "</tool_call>", "<tool_", "\n", " ", ";", "{", "}", '"', "\\", "<|python_tag|>", "x",
          PARIS, NOW, LL_PARIS, '{"name": "f"}', '"name"', ": ", ", ", '"arguments"', '"parameters"', "{}"]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=12), cuts=st.lists(st.integers(0, 400), max_size=6),
       parser=st.sampled_from([HERMES, LLAMA]))
def test_any_text_any_split_streams_the_finished_parse(parts: list[str], cuts: list[int], parser: ToolParser) -> None:
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    reply = parser.parse(text)
    content, deltas, _ = _streamed(parser, pieces)
    assert content == (reply.content or "")
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c.function.name, c.function.arguments) for c in reply.calls]
    assert reply.content == text or reply.calls  # no calls: all of it is content
    for d in deltas:
        assert isinstance(json.loads(d.function.arguments), dict)


def test_content_holds_back_only_what_may_start_a_call() -> None:
    s = HERMES.stream()
    assert s.push("Sure").content == "Sure"
    assert s.push(" <tool").content == ""  # may be the start of "<tool_call>" (the blank before it too)
    out = s.push('_call>\n{"name": "get_time"')
    assert (out.content, out.calls) == ("", [])
    out = s.push(', "arguments": {}}\n</tool_call>')
    assert out.content == "" and [c.function.name for c in out.calls] == ["get_time"]
    assert s.finish().content == ""
    s = HERMES.stream()
    assert s.push("a <to").content == "a"
    assert s.push("o late").content == " <too late"  # not a call after all: released
    s = LLAMA.stream()
    assert s.push(" <|python").content == ""  # may be the tag
    assert s.push("ic").content == " <|pythonic"  # it is not: content from here on
    assert s.push(' {"name"').content == ' {"name"'


@pytest.mark.parametrize("text", [
    f"<think>\nweather first\n</think>\n\nOn it.\n<tool_call>\n{PARIS}\n</tool_call>",
    f"<think>\n<tool_call>not this</tool_call>\n</think>\n\n<tool_call>\n{NOW}\n</tool_call>",
    "<think>\nno calls\n</think>\n\nIt is 4.",
])
def test_reasoning_then_tool_calls_stream_as_the_finished_reply_splits(text: str) -> None:
    """chat's filter: the <think> block is reasoning, the calls come out of the rest, on every split."""
    thought, rest = split_reasoning(text)
    reply = HERMES.parse(rest)
    for pieces in _splits(text):
        f = ReplyFilter(ReasoningStream(), HERMES.stream())
        parts = [f.push(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
        assert "".join(t for t, _, _ in parts) == (thought or "")
        assert "".join(c for _, c, _ in parts) == (reply.content or "")
        calls = [(d.function.name, d.function.arguments) for _, _, ds in parts for d in ds]
        assert calls == [(c.function.name, c.function.arguments) for c in reply.calls]
        assert f.called == bool(reply.calls)


def _allows(grammar: str, text: str) -> bool:
    """The grammar accepts exactly `text` (byte-level tokens) as a whole output."""
    tok = Tokenizer.byte_level(512)
    lltok = llg.LLTokenizer(tok.hf.to_str(), n_vocab=512, eos_token=list(tok.eos_token_ids), slices=None)
    matcher = llg.LLMatcher(lltok, grammar_of(StructuredOutputs(grammar=grammar)))
    return matcher.consume_tokens(tok.encode(text)) and matcher.is_accepting()


@pytest.mark.parametrize(("parser", "one", "two"), [
    (HERMES, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>',
     '\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'),
    (LLAMA, '{"name":"get_weather","parameters":{"city":"Paris"}}', '; {"name":"get_time","parameters":{}}'),
])
def test_constraint_grammar_allows_calls_the_parser_reads(parser: ToolParser, one: str, two: str) -> None:
    assert tool_constraint(_req(tools=[WEATHER]), parser) is None  # auto
    assert tool_constraint(_req(tools=[WEATHER], tool_choice="none"), parser) is None
    required = tool_constraint(_req(tools=[WEATHER, CLOCK], tool_choice="required"), parser)
    assert required is not None and required.grammar is not None
    assert _allows(required.grammar, one) and _allows(required.grammar, one + two)
    assert not _allows(required.grammar, "Sure. " + one)
    assert not _allows(required.grammar, one.replace('"Paris"', "5"))  # against the schema
    single = tool_constraint(_req(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False), parser)
    assert single is not None and single.grammar is not None and not _allows(single.grammar, one + two)
    pick = {"type": "function", "function": {"name": "get_time"}}
    named = tool_constraint(_req(tools=[WEATHER, CLOCK], tool_choice=pick), parser)
    assert named is not None and named.grammar is not None and "get_weather" not in named.grammar
    assert _allows(named.grammar, two.lstrip("\n; ")) and not _allows(named.grammar, one)
    reply = parser.parse(one + two)
    assert reply.content is None and [(c.function.name, json.loads(c.function.arguments)) for c in reply.calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_parser_names() -> None:
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder"]
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic, qwen3_coder"):
        make_tool_parser("jamba")


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
    assert template_tools(_req(tools=[WEATHER], tool_choice="none")) is None
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
