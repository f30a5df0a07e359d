"""What every tool-call format shares: the parser interface (`pdserve serve --tool-call-parser`)
and the streaming contract all formats keep.

A `ToolParser` is used three ways: `parse` splits a finished reply into content and calls,
`stream` gives a `ToolCallStream` that does the same a delta at a time, and `grammar` is the
constraint of tool_choice "required" / a named function (a Lark grammar whose call bodies are
`%json` schemas, enforced by engine/structured.py).

Streaming contract (every format):

- Content before the first call streams as it comes; what may still turn out to be the start of
  a call is held back (a partial start marker, the whitespace right before it).
- A call goes out in the chunk in which its text becomes complete and parses, never before, whole
  in one delta: `index` j (0, 1, ... in reply order), `id`, `type` "function", `function.name` and
  the complete `function.arguments`. A call whose text turns out malformed (its JSON does not
  parse, it has no string "name", its arguments are not a JSON object) or is cut off (max_tokens,
  a stop string) therefore never reaches the client as a call: it is content when it comes before
  the first well-formed call and dropped after it, exactly as in the non-streamed reply. (vLLM
  streams a call's arguments as partial JSON while they are generated; a call that then turns out
  malformed or cut off leaves the client holding a broken call, which no later chunk can take back.
  Releasing any part of a call earlier would allow the same.)
- `arguments` is `json.dumps(obj, ensure_ascii=False)` of the parsed arguments object, the same
  string streamed or not; a model that wrote the arguments as a JSON string holding an object gets
  that string as it wrote it.
- The non-streamed reply is the stream fed the whole text at once (`parse`), so the two agree for
  every way the text may be split into deltas.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import JsonValue

from pdserve.server.protocol import DeltaToolCall, FunctionCallOut, FunctionDef, ToolCallOut

NO_ARGUMENTS: dict[str, JsonValue] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ParsedReply:
    """A finished reply: its content (None when calls took its place and nothing came before them)
    and its calls; no well-formed call: the whole text is the content."""

    content: str | None
    calls: list[ToolCallOut]


@dataclass
class ToolDelta:
    """What one pushed delta releases: content to send, and the calls completed by it."""

    content: str = ""
    calls: list[DeltaToolCall] = field(default_factory=list)


def parse_call(body: str, argument_keys: Sequence[str]) -> FunctionCallOut | None:
    """One call from its JSON text (`{"name": ..., <argument key>: {...}}`); None when it is not a
    well-formed call. The arguments are under the first of `argument_keys` present (none: `{}`)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in argument_keys if k in obj), {})
    if isinstance(args, str):  # the arguments' JSON text, as OpenAI's API carries them
        try:
            decoded = json.loads(args)
        except (ValueError, RecursionError):
            return None
        return FunctionCallOut(name=obj["name"], arguments=args) if isinstance(decoded, dict) else None
    if not isinstance(args, dict):
        return None
    return FunctionCallOut(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False))


def rstrip_end(text: str, end: int, floor: int) -> int:
    """`end` moved back over the whitespace before it, not below `floor`."""
    while end > floor and text[end - 1].isspace():
        end -= 1
    return end


class ToolCallStream(ABC):
    """One reply's text, a delta at a time: `push` each delta, `finish` at the end; each returns
    the content safe to send now and the calls completed (see the module's streaming contract)."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[ToolCallOut] = []  # every call released so far, in order
        self._sent = 0  # characters of `text` released as content

    def push(self, delta: str) -> ToolDelta:
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> ToolDelta:
        """The end of the reply: what is still held back is settled."""
        return self._advance(final=True)

    @abstractmethod
    def _advance(self, final: bool) -> ToolDelta:
        """Release what the text so far settles (all of it when `final`)."""

    def _release(self, end: int, out: ToolDelta) -> None:
        """Send `text` up to `end` as content (what was sent already is not sent again)."""
        if end > self._sent:
            out.content += self.text[self._sent:end]
            self._sent = end

    def _call_id(self) -> str:
        """A fresh id for the next call (formats whose models require a shape of their own override it)."""
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    def _emit(self, function: FunctionCallOut, out: ToolDelta) -> None:
        call = ToolCallOut(id=self._call_id(), function=function)
        out.calls.append(DeltaToolCall(index=len(self.calls), id=call.id, function=function))
        self.calls.append(call)


class ToolParser(ABC):
    """One format models write their tool calls in; stateless (a stream holds one reply's state)."""

    name: ClassVar[str]  # the --tool-call-parser value
    argument_key: ClassVar[str]  # where the format's call object holds the arguments
    # The format's call marker is a special token the model's tokenizer drops when decoding with
    # skip_special_tokens (vLLM's parsers of such formats turn it off for requests with tools, as chat does).
    needs_special_tokens: ClassVar[bool] = False

    @abstractmethod
    def stream(self, tools: Sequence[FunctionDef] = ()) -> ToolCallStream:
        """A fresh stream for one reply to a request offering `tools` (formats whose arguments are
        not JSON read their types from the tools' schemas; the others ignore them)."""

    @abstractmethod
    def grammar(self, tools: Sequence[FunctionDef], parallel: bool) -> str:
        """A Lark grammar allowing only calls of `tools` in this format (several when `parallel`)."""

    def parse(self, text: str, tools: Sequence[FunctionDef] = ()) -> ParsedReply:
        """A finished reply: the stream fed all of it at once."""
        stream = self.stream(tools)
        content = stream.push(text).content + stream.finish().content
        return ParsedReply(content or None, stream.calls) if stream.calls else ParsedReply(content, [])

    def call_schema(self, tools: Sequence[FunctionDef]) -> str:
        """The `%json` schema of one call of any of `tools` (compact, as the other constraints are)."""
        bodies: list[dict[str, object]] = [{
            "type": "object", "additionalProperties": False, "required": ["name", self.argument_key],
            "properties": {"name": {"const": t.name}, self.argument_key: t.parameters or NO_ARGUMENTS},
        } for t in tools]
        body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
        return json.dumps({**body, "x-guidance": {"whitespace_flexible": False}})
