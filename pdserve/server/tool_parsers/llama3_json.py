"""`--tool-call-parser llama3_json`: the JSON tool calls Llama 3.1 / 3.2 chat templates teach, as
vLLM's parser of that name reads them. A reply that calls tools is nothing but the calls:

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", ...}

The `<|python_tag|>` prefix is optional (it is a special token, often skipped when decoding); the
calls are separated by `;` or whitespace; the arguments are under "parameters" ("arguments" is
accepted too). A call object runs from its `{` to the brace that closes it (outside strings).
A reply whose first non-blank text is neither the tag nor `{`, or whose first object is not a
well-formed call, is all content; after the first call, the first thing that is not another
well-formed call ends the calls and the rest is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum, auto

from pdserve.server.protocol import FunctionDef
from pdserve.server.tool_parsers.base import ToolCallStream, ToolDelta, ToolParser, parse_call
from pdserve.server.tool_parsers.scan import ObjectEnd, skip_blanks

PYTHON_TAG = "<|python_tag|>"


class _State(Enum):
    START = auto()  # nothing but blanks (and maybe the tag) yet
    CALL = auto()  # inside a call object
    BETWEEN = auto()  # after a call: a separator and another call may follow
    CONTENT = auto()  # not calls: everything is content
    DONE = auto()  # the calls have ended: the rest is dropped


class Llama3JsonStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self._state = _State.START
        self._pos = 0  # START / BETWEEN: where to look next
        self._tagged = False  # START: the tag has been read
        self._separated = False  # BETWEEN: the `;` has been seen
        self._object: ObjectEnd | None = None  # CALL: the call being read

    def _advance(self, final: bool) -> ToolDelta:
        out = ToolDelta()
        while self._step(final, out):
            pass
        if self._state is _State.CONTENT:
            self._release(len(self.text), out)
        return out

    def _step(self, final: bool, out: ToolDelta) -> bool:
        """One transition the text so far allows (all of them, when `final`); False: none."""
        text, state = self.text, self._state
        if state is _State.START:
            i = skip_blanks(text, self._pos)
            if not self._tagged and text.startswith(PYTHON_TAG, i):
                self._tagged, i = True, skip_blanks(text, i + len(PYTHON_TAG))
            elif not self._tagged and PYTHON_TAG.startswith(text[i:]) and not final:
                self._pos = i  # nothing yet, or maybe the start of the tag
                return False
            if i == len(text) and not final:
                self._pos = i
                return False
            return self._open_call(i)
        if state is _State.CALL:
            assert self._object is not None
            end = self._object.find(text)
            if end is None:
                if final:
                    self._state = _State.DONE if self.calls else _State.CONTENT  # cut off
                return final
            function = parse_call(text[self._object.start:end], ("parameters", "arguments"))
            if function is None:
                self._state = _State.DONE if self.calls else _State.CONTENT
                return True
            self._emit(function, out)
            self._state, self._pos, self._separated = _State.BETWEEN, end, False
            return True
        if state is _State.BETWEEN:
            i = skip_blanks(text, self._pos)
            if i < len(text) and text[i] == ";" and not self._separated:
                self._separated, i = True, skip_blanks(text, i + 1)
            self._pos = i
            if i == len(text) and not final:
                return False
            return self._open_call(i)
        return False

    def _open_call(self, i: int) -> bool:
        """At `i` a call object starts, or the calls (or the hope of any) end."""
        if i < len(self.text) and self.text[i] == "{":
            self._state, self._object = _State.CALL, ObjectEnd(i)
        else:
            self._state = _State.DONE if self.calls else _State.CONTENT
        return True


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    argument_key = "parameters"

    def stream(self, tools: Sequence[FunctionDef] = ()) -> Llama3JsonStream:
        return Llama3JsonStream()

    def grammar(self, tools: Sequence[FunctionDef], parallel: bool) -> str:
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: %json {self.call_schema(tools)}\n"
