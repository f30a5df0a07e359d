"""`--tool-call-parser mistral`: the tool calls of Mistral / Mixtral instruct models, as vLLM's
parser of that name reads them. The calls follow a `[TOOL_CALLS]` marker, in either of the forms
Mistral's tokenizers teach:

    Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]
    Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

(the first up to tokenizer v7, the second from v11 on, where a `[CALL_ID]id` may come between the
name and `[ARGS]`; it is skipped). A single call object right after the marker is read as well.
`[TOOL_CALLS]` is a special token, so requests with tools decode with skip_special_tokens off.

The content is the text before the first well-formed call (trailing whitespace dropped); a marker
whose first call is malformed is content and the search goes on after it. After the first call,
the first thing that is not another well-formed call ends the calls and the rest is dropped.
Call ids are 9 letters and digits: Mistral's chat templates refuse any other when they come back.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence
from enum import Enum, auto

from pdserve.server.markers import partial_marker
from pdserve.server.protocol import FunctionCallOut, FunctionDef
from pdserve.server.tool_parsers.arg_grammar import compact_schema
from pdserve.server.tool_parsers.base import (
    NO_ARGUMENTS,
    ToolCallStream,
    ToolDelta,
    ToolParser,
    parse_call,
    rstrip_end,
)
from pdserve.server.tool_parsers.scan import ObjectEnd, skip_blanks

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_ALPHANUMERIC = string.ascii_letters + string.digits
_ID_CHARS = frozenset(_ALPHANUMERIC)
_NAME_CHARS = _ID_CHARS | frozenset("_.-")
_WAIT = -1  # a scan reached the end of the text before it could decide


class _State(Enum):
    SEEK = auto()  # no call yet: looking for the marker; what comes before it is content
    GROUP = auto()  # right after a marker: which form follows
    HEAD = auto()  # the v11 form: name, maybe a call id, then [ARGS]
    ITEM = auto()  # in the list form: the `{` of the next item
    OBJECT = auto()  # inside a call object, or the v11 form's arguments object
    NEXT = auto()  # after a list item: `,` and another, or `]`
    AFTER = auto()  # after a group: another marker, or the end of the calls
    DONE = auto()  # the calls have ended: the rest is dropped


def _args_call(name: str, body: str) -> FunctionCallOut | None:
    """The v11 form's call: `body` must be a JSON object."""
    try:
        args = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return FunctionCallOut(name=name, arguments=json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) \
        else None


def _span(text: str, i: int, chars: frozenset[str]) -> int:
    """The end of the run of `chars` that starts at `i`."""
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _expect(text: str, i: int, marker: str) -> int | None:
    """After `marker` when it is at `i`; _WAIT when the text ends in a prefix of it; else None."""
    if text.startswith(marker, i):
        return i + len(marker)
    return _WAIT if marker.startswith(text[i:]) else None


class MistralStream(ToolCallStream):
    """One reply in the mistral format (the module's rules), a delta at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._state = _State.SEEK
        self._find_from = 0  # SEEK: where the next marker may be
        self._marker = 0  # where the current group's marker is
        self._pos = 0  # GROUP / HEAD / ITEM / NEXT / AFTER: where to read next
        self._object: ObjectEnd | None = None  # OBJECT: the object being read
        self._name: str | None = None  # OBJECT: the v11 call's name (None: the object is a whole call)
        self._in_list = False  # OBJECT: the object is a list item

    def _call_id(self) -> str:
        return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))

    def _advance(self, final: bool) -> ToolDelta:
        out = ToolDelta()
        while self._step(final, out):
            pass
        if self._state is _State.SEEK:
            end = len(self.text) if final else len(self.text) - partial_marker(self.text, TOOL_CALLS)
            self._release(end if final else rstrip_end(self.text, end, self._sent), out)
        return out

    def _step(self, final: bool, out: ToolDelta) -> bool:
        """One transition the text so far allows (all of them, when `final`); False: none."""
        state = self._state
        if state is _State.SEEK:
            return self._seek(out)
        if state is _State.DONE:
            return False
        if state is _State.OBJECT:
            return self._read_object(final, out)
        i = skip_blanks(self.text, self._pos)
        if i == len(self.text) and not final:
            self._pos = i
            return False
        if state is _State.HEAD:
            return self._head(i, final)
        moved = {_State.GROUP: self._group, _State.ITEM: self._item, _State.NEXT: self._next,
                 _State.AFTER: self._after}[state](i)
        if moved is None and not final:
            self._pos = i
            return False
        return True if moved else self._fail()

    def _seek(self, out: ToolDelta) -> bool:
        m = self.text.find(TOOL_CALLS, self._find_from)
        if m < 0:
            self._find_from = max(self._find_from, len(self.text) - len(TOOL_CALLS) + 1)
            return False
        self._release(rstrip_end(self.text, m, self._sent), out)
        self._state, self._marker, self._pos = _State.GROUP, m, m + len(TOOL_CALLS)
        return True

    def _group(self, i: int) -> bool | None:
        """After a marker: the list form, a lone call object, or the v11 form's name. Each reader
        of a state says whether it moved on (True), found no call (False) or must wait (None)."""
        c = self.text[i] if i < len(self.text) else ""
        if c == "[":
            self._state, self._pos = _State.ITEM, i + 1
        elif c == "{":
            self._open(i, None, in_list=False)
        elif c and c in _NAME_CHARS:
            self._state, self._pos = _State.HEAD, i
        else:
            return False
        return True

    def _head(self, i: int, final: bool) -> bool:
        """`name [CALL_ID]id [ARGS] {`: open the arguments, or wait for more, or fail."""
        j = _span(self.text, i, _NAME_CHARS)
        at = self._arguments_start(j)
        if at is None or j == i:
            return self._fail()
        if at == _WAIT:
            return self._fail() if final else False
        self._open(at, self.text[i:j], in_list=False)
        return True

    def _arguments_start(self, j: int) -> int | None:
        """Where the `{` of the arguments is, the name ending at `j`; _WAIT; None: not the v11 form."""
        text = self.text
        k = skip_blanks(text, j)
        if _expect(text, k, ARGS) is None:  # maybe a call id first
            after = _expect(text, k, CALL_ID)
            if after is None or after == _WAIT:
                return after
            k = skip_blanks(text, _span(text, skip_blanks(text, after), _ID_CHARS))
        after = _expect(text, k, ARGS)
        if after is None or after == _WAIT:
            return after
        a = skip_blanks(text, after)
        return _WAIT if a == len(text) else a if text[a] == "{" else None

    def _item(self, i: int) -> bool | None:
        if i < len(self.text) and self.text[i] == "{":
            self._open(i, None, in_list=True)
            return True
        return False

    def _next(self, i: int) -> bool | None:
        c = self.text[i] if i < len(self.text) else ""
        if c == ",":
            self._state, self._pos = _State.ITEM, i + 1
        elif c == "]":
            self._state, self._pos = _State.AFTER, i + 1
        else:
            return False
        return True

    def _after(self, i: int) -> bool | None:
        after = _expect(self.text, i, TOOL_CALLS) if i < len(self.text) else None
        if after is None:
            return False
        if after == _WAIT:
            return None
        self._state, self._marker, self._pos = _State.GROUP, i, after
        return True

    def _open(self, at: int, name: str | None, in_list: bool) -> None:
        self._state, self._object, self._name, self._in_list = _State.OBJECT, ObjectEnd(at), name, in_list

    def _read_object(self, final: bool, out: ToolDelta) -> bool:
        assert self._object is not None
        end = self._object.find(self.text)
        if end is None:
            return self._fail() if final else False  # cut off
        body = self.text[self._object.start:end]
        function = parse_call(body, ("arguments",)) if self._name is None else _args_call(self._name, body)
        if function is None:
            return self._fail()
        self._emit(function, out)
        self._state, self._pos = (_State.NEXT if self._in_list else _State.AFTER), end
        return True

    def _fail(self) -> bool:
        """What follows the marker is not (or no longer) a well-formed call: before any call the
        marker is content and the search goes on after it; after one the calls end."""
        if self.calls:
            self._state = _State.DONE
        else:
            self._state, self._find_from = _State.SEEK, self._marker + len(TOOL_CALLS)
        return True


class MistralToolParser(ToolParser):
    name = "mistral"
    argument_key = "arguments"
    needs_special_tokens = True

    def stream(self, tools: Sequence[FunctionDef] = ()) -> MistralStream:
        return MistralStream()

    def grammar(self, tools: Sequence[FunctionDef], parallel: bool) -> str:
        """The marker, then either form (the model picks the one it was trained on)."""
        heads = [f"{json.dumps(t.name + ARGS)} a{j}" for j, t in enumerate(tools)]
        args = [f"a{j}: %json {compact_schema(t.parameters or NO_ARGUMENTS)}" for j, t in enumerate(tools)]
        items = ' (", " item)*' if parallel else ""
        calls = f" ({json.dumps(TOOL_CALLS)} v11)*" if parallel else ""
        return "\n".join([
            f"start: {json.dumps(TOOL_CALLS)} (list | v11{calls})",
            f'list: "[" item{items} "]"',
            f"item: %json {self.call_schema(tools)}",
            "v11: " + " | ".join(heads),
            *args,
        ]) + "\n"

