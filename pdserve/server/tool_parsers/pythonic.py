"""`--tool-call-parser pythonic`: the Python-call syntax of Llama 3.2 (light-weight models) and
Llama 4, as vLLM's parser of that name reads it. A reply that calls tools is a Python list of calls
with keyword arguments:

    [get_weather(city="Paris", unit="c"), get_time()]

The list may follow Llama 4's `<|python_start|>` (a special token, often skipped when decoding).
Each call is read with `ast`, never evaluated: its function a (dotted) name, its arguments keyword
ones whose values are literals (server/tool_parsers/pyliteral.py); anything else is not a call.
A reply whose first non-blank text is not the list, or whose first item is not a call, is all
content; after the first call, the first item that is not a call (or a cut-off list) ends the
calls and the rest is dropped, as is anything after the list.

This departs from vLLM's non-streamed parse, which is all or nothing: a reply that is not exactly
a list of calls (text after the `]`, an item that is not a call, a cut-off list) is all content
there. pdserve reads such a reply as vLLM's streamed parse does (the calls before the fault stand,
the rest is dropped), streamed or not, because the streaming contract (base.py) leaves no other
way: a call goes out with the `,` or `]` that settles it and cannot be taken back, while the fault
may come any number of tokens later; and the non-streamed reply is the stream fed the whole text,
so the two agree however the text is split. vLLM's reading would need either every call held back
to the end of the reply or a finished reply that disagrees with the stream of the same text.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from enum import Enum, auto

from pdserve.server.protocol import FunctionCallOut, FunctionDef
from pdserve.server.tool_parsers.arg_grammar import argument_rules, compact_schema, params_of
from pdserve.server.tool_parsers.base import ToolCallStream, ToolDelta, ToolParser
from pdserve.server.tool_parsers.pyliteral import PARSE_ERRORS, NotALiteral, literal_value, parse_expression
from pdserve.server.tool_parsers.scan import PythonItemEnd, skip_blanks

PYTHON_START = "<|python_start|>"
# What the first item may look like before its arguments start: blanks, then a (dotted) name.
_CALL_HEAD = re.compile(r"\s*(?:[A-Za-z_][\w.]*\s*)?\Z")


class _State(Enum):
    START = auto()  # nothing but blanks (and maybe the tag) yet
    ITEM = auto()  # inside a list item
    CONTENT = auto()  # not calls: everything is content
    DONE = auto()  # the calls have ended: the rest is dropped


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = _dotted(node.value)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def parse_python_call(text: str) -> FunctionCallOut | None:
    """One call from its Python text (`name(key=literal, ...)`); None when it is not one."""
    try:
        node = parse_expression(text)
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted(node.func)
        if name is None or any(k.arg is None for k in node.keywords):  # **kwargs
            return None
        args = {k.arg: literal_value(k.value) for k in node.keywords if k.arg is not None}
        return FunctionCallOut(name=name, arguments=json.dumps(args, ensure_ascii=False))
    except (NotALiteral, *PARSE_ERRORS):
        return None


class PythonicStream(ToolCallStream):
    """One reply in the pythonic format (the module's rules), a delta at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._state = _State.START
        self._pos = 0  # START: where to look next
        self._tagged = False  # START: the tag has been read
        self._item: PythonItemEnd | None = None  # ITEM: the item being read
        self._headed = False  # ITEM: the first item's arguments have started (it may be a call)

    def _advance(self, final: bool) -> ToolDelta:
        out = ToolDelta()
        while self._step(final, out):
            pass
        if self._state is _State.CONTENT:
            self._release(len(self.text), out)
        return out

    def _step(self, final: bool, out: ToolDelta) -> bool:
        """One transition the text so far allows (all of them, when `final`); False: none."""
        if self._state is _State.START:
            return self._start(final)
        if self._state is _State.ITEM:
            return self._read_item(final, out)
        return False

    def _start(self, final: bool) -> bool:
        text = self.text
        i = skip_blanks(text, self._pos)
        if not self._tagged and text.startswith(PYTHON_START, i):
            self._tagged, i = True, skip_blanks(text, i + len(PYTHON_START))
        elif not self._tagged and PYTHON_START.startswith(text[i:]) and not final:
            self._pos = i  # nothing yet, or maybe the start of the tag
            return False
        self._pos = i
        if i == len(text):
            if final:
                self._state = _State.CONTENT
            return final
        if text[i] == "[":
            self._state, self._item, self._headed = _State.ITEM, PythonItemEnd(i + 1), False
        else:
            self._state = _State.CONTENT
        return True

    def _read_item(self, final: bool, out: ToolDelta) -> bool:
        assert self._item is not None
        text, start = self.text, self._item.start
        if not self.calls and not self._headed:
            head = text[start:]
            if "(" in head:
                self._headed = _CALL_HEAD.match(head[:head.index("(")]) is not None
                if not self._headed:
                    return self._stop()
            elif _CALL_HEAD.match(head) is None:
                return self._stop()  # not a call: no need to wait for the item's end
        end = self._item.find(text)
        if end is None:
            return self._stop() if final else False  # cut off
        function = parse_python_call(text[start:end]) if text[end] in ",]" else None
        if function is None:
            return self._stop()
        self._emit(function, out)
        if text[end] == ",":
            self._item = PythonItemEnd(end + 1)
        else:
            self._state = _State.DONE
        return True

    def _stop(self) -> bool:
        """The calls end here (or, before any, turn out not to be calls)."""
        self._state = _State.DONE if self.calls else _State.CONTENT
        return True


class PythonicToolParser(ToolParser):
    name = "pythonic"
    argument_key = "arguments"

    def stream(self, tools: Sequence[FunctionDef] = ()) -> PythonicStream:
        return PythonicStream()

    def grammar(self, tools: Sequence[FunctionDef], parallel: bool) -> str:
        """`[name(key=value, ...), ...]`, the arguments in schema order, each value a JSON value of
        its schema (JSON's literals read as Python's)."""
        calls, rules = [], []
        for j, tool in enumerate(tools):
            items = []
            for i, param in enumerate(params_of(tool)):
                rules.append(f"t{j}_v{i}: %json {compact_schema(param.schema)}")
                items.append((f"{json.dumps(param.name + '=')} t{j}_v{i}", param.required))
            args, arg_rules = argument_rules(f"t{j}", items, ", ")
            rules += arg_rules
            calls.append(" ".join(p for p in (json.dumps(tool.name + "("), args, '")"') if p))
        repeat = ' (", " call)*' if parallel else ""
        return "\n".join([f'start: "[" call{repeat} "]"', "call: " + " | ".join(f"c{j}" for j in range(len(calls))),
                          *(f"c{j}: {c}" for j, c in enumerate(calls)), *rules]) + "\n"
