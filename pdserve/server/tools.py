"""Tool calling in the Hermes format Qwen models are trained on (vLLM's `hermes` parser):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The chat template renders the tools into the prompt. `tool_choice` "required" or a named function
constrains the output to such calls (a Lark grammar whose call body is the arguments' JSON schema,
enforced by engine/structured.py); "auto" leaves the model free and parses what it wrote: each
well-formed call becomes a `tool_calls` entry, the text before the first one the content.
Streamed, content goes out as it comes until a call starts; the calls go out at the end.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.sampling_params import StructuredOutputs
from pdserve.server.markers import partial_marker
from pdserve.server.protocol import ChatCompletionRequest, FunctionCallOut, NamedToolChoice, ToolCallOut

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_CALL = re.compile(re.escape(TOOL_CALL_START) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_END), re.S)
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def template_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them (OpenAI's shape), or None."""
    if not req.tools or req.effective_tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def tool_constraint(req: ChatCompletionRequest) -> StructuredOutputs | None:
    """For tool_choice "required" or a named function: a grammar allowing only tool calls."""
    choice = req.effective_tool_choice
    if not req.tools or choice in ("none", "auto"):
        return None
    tools = [t for t in req.tools if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name]
    bodies = [{
        "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
        "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters or _NO_ARGUMENTS},
    } for t in tools]
    body = {**(bodies[0] if len(bodies) == 1 else {"anyOf": bodies}), "x-guidance": {"whitespace_flexible": False}}
    repeat = ' ("\\n" call)*' if req.parallel_tool_calls and not isinstance(choice, NamedToolChoice) else ""
    grammar = (f"start: call{repeat}\n"
               f"call: {json.dumps(TOOL_CALL_START + chr(10))} body {json.dumps(chr(10) + TOOL_CALL_END)}\n"
               f"body: %json {json.dumps(body)}\n")
    return StructuredOutputs(grammar=grammar)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCallOut]]:
    """(content, calls) of a finished reply; no well-formed call: the whole text is the content."""
    calls: list[ToolCallOut] = []
    first = None
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", {})
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        calls.append(ToolCallOut(id=f"chatcmpl-tool-{uuid.uuid4().hex}",
                                 function=FunctionCallOut(name=obj["name"], arguments=arguments)))
        first = m.start() if first is None else first
    if not calls:
        return text, []
    return text[:first].strip() or None, calls


@dataclass
class ToolStream:
    """Streaming: the content safe to send now, holding back what may be the start of a call."""

    text: str = ""
    sent: int = 0  # characters of `text` sent as content
    in_call: bool = field(default=False)

    def push(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        start = self.text.find(TOOL_CALL_START, self.sent)
        if start >= 0:
            self.in_call = True
            out, self.sent = self.text[self.sent:start], start
            return out
        hold = partial_marker(self.text, TOOL_CALL_START)
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCallOut]]:
        """The content not sent yet, and the calls (a malformed call is content after all)."""
        rest = self.text[self.sent:]
        if not self.in_call:
            return rest, []
        _, calls = parse_tool_calls(rest)
        return ("", calls) if calls else (rest, [])

