"""`--tool-call-parser qwen3_coder`: the XML-like calls of Qwen3-Coder, as vLLM's parser of that
name reads them. Each call is a block of its own, the arguments one by one:

    Let me check.
    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Blocks are found, and the content settled, as with `hermes` (hermes.py; the same markers). A
parameter's value is the text between its tags less one newline at each end (a missing
`</parameter>` ends it at the next `<parameter=` or `</function>`); it becomes the JSON value its
tool's schema types it as: `null` (any case, blanks around it) is JSON null whatever the type, as
in vLLM; else "string" (or no known type: an unknown tool or parameter, no "type")
keeps the text, "integer" / "number" / "boolean" / "null" / "object" / "array" read it as JSON (or
as a Python literal), and text that does not read as one of the schema's types stays a string.
A block with anything but whitespace around its function or between parameters is malformed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pydantic import JsonValue

from pdserve.server.protocol import FunctionCallOut, FunctionDef
from pdserve.server.tool_parsers.arg_grammar import argument_rules, compact_schema, params_of
from pdserve.server.tool_parsers.base import ToolParser
from pdserve.server.tool_parsers.hermes import TOOL_CALL_END, TOOL_CALL_START, HermesStream
from pdserve.server.tool_parsers.pyliteral import NotALiteral, python_literal
from pdserve.server.tool_parsers.scan import skip_blanks

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*\Z", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.S)
_TYPES: dict[str, type | tuple[type, ...]] = {
    "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list, "null": type(None)}
# A string parameter's value in the constraint: any text up to its first `</parameter>`, which ends
# it after a newline.
_TEXT_TOKEN = "PARAM_TEXT: /(?s:.*)\\n<\\/parameter>/ & ~/(?s:.*)<\\/parameter>(?s:.+)/"


def schema_types(schema: JsonValue) -> set[str]:
    """The JSON types a parameter's schema names (empty: none known)."""
    declared = schema.get("type") if isinstance(schema, dict) else None
    names = declared if isinstance(declared, list) else [declared]
    return {t for t in names if isinstance(t, str)}


def typed_value(text: str, schema: JsonValue) -> JsonValue:
    """A parameter's text as the JSON value of one of its schema's non-string types, else the text;
    `null` (any case) is null for every type, a string's too, as vLLM reads it."""
    stripped = text.strip()
    if stripped.lower() == "null":
        return None
    wanted = tuple(_TYPES[t] for t in schema_types(schema) if t in _TYPES)
    if not wanted:
        return text
    for read in (_json, python_literal, _bool_word):
        try:
            value = read(stripped)
        except (NotALiteral, ValueError, RecursionError):
            continue
        if isinstance(value, bool) and bool not in wanted:
            continue  # a bool is an int to Python, never to JSON
        if isinstance(value, wanted):
            return value
        if isinstance(value, float) and int in wanted and value.is_integer():
            return int(value)
    return text


def _json(text: str) -> JsonValue:
    """JSON text's value; ValueError for NaN and the infinities too (not JSON, though json reads them)."""
    return json.loads(text, parse_constant=_not_json)


def _not_json(word: str) -> JsonValue:
    raise ValueError(word)


def _bool_word(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise ValueError(text)
    return lowered == "true"


def _unwrap(value: str) -> str:
    """A value less the newline its tags put at each end."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


class Qwen3CoderStream(HermesStream):
    """One reply in the qwen3_coder format: hermes's blocks, each body read against `tools`."""

    def __init__(self, tools: Sequence[FunctionDef]) -> None:
        super().__init__()
        self._properties = {t.name: {p.name: p.schema for p in params_of(t)} for t in tools}

    def _parse_body(self, body: str) -> FunctionCallOut | None:
        m = _FUNCTION.match(body)
        if m is None:
            return None
        name, inner = m.group(1).strip(), m.group(2)
        properties = self._properties.get(name, {})
        args: dict[str, JsonValue] = {}
        i = skip_blanks(inner, 0)
        while i < len(inner):
            p = _PARAMETER.match(inner, i)
            if p is None:
                return None
            key = p.group(1).strip()
            args[key] = typed_value(_unwrap(p.group(2)), properties.get(key))
            i = skip_blanks(inner, p.end())
        if not name:
            return None
        try:
            return FunctionCallOut(name=name, arguments=json.dumps(args, ensure_ascii=False))
        except ValueError:  # an integer too long to write
            return None


class Qwen3CoderToolParser(ToolParser):
    name = "qwen3_coder"
    argument_key = "arguments"

    def stream(self, tools: Sequence[FunctionDef] = ()) -> Qwen3CoderStream:
        return Qwen3CoderStream(tools)

    def grammar(self, tools: Sequence[FunctionDef], parallel: bool) -> str:
        """Blocks of the tools' calls, the parameters in schema order: a parameter that may be a
        string (or of no known type) any text without `</parameter>` (one of its `enum` when that
        lists strings only), any other a JSON value of its schema."""
        calls, rules = [], []
        for j, tool in enumerate(tools):
            items = []
            for i, param in enumerate(params_of(tool)):
                rules.append(f"t{j}_v{i}: {_value_expression(param.schema)}")
                items.append((f"{json.dumps(f'<parameter={param.name}>{chr(10)}')} t{j}_v{i} {json.dumps(chr(10))}",
                              param.required))
            args, arg_rules = argument_rules(f"t{j}", items, "")
            rules += arg_rules
            head = json.dumps(f"{TOOL_CALL_START}\n<function={tool.name}>\n")
            calls.append(" ".join(p for p in (head, args, json.dumps(f"</function>\n{TOOL_CALL_END}")) if p))
        repeat = ' ("\\n" call)*' if parallel else ""
        return "\n".join([f"start: call{repeat}", "call: " + " | ".join(f"c{j}" for j in range(len(calls))),
                          *(f"c{j}: {c}" for j, c in enumerate(calls)), *rules, _TEXT_TOKEN]) + "\n"


def _value_expression(schema: JsonValue) -> str:
    """One parameter's value, its closing tag included."""
    close = json.dumps("\n</parameter>")
    types = schema_types(schema)
    if types and "string" not in types:
        return f"%json {compact_schema(schema)} {close}"
    enum = schema.get("enum") if isinstance(schema, dict) else None
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return "(" + " | ".join(json.dumps(v + "\n</parameter>") for v in enum) + ")"
    return "PARAM_TEXT"
