"""A generated reply as chat completions and responses present it: the `<think>` block first (with
`--reasoning-parser`), then tool calls out of the rest (when the request has tools).

A finished reply is split by `parse_reply`; a streamed one a delta at a time by `ReplyFilter`
(server/reasoning.py and server/tool_parsers/base.py say where the two may differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.server.protocol import DeltaToolCall, FunctionDef
from pdserve.server.reasoning import ReasoningStream, split_reasoning
from pdserve.server.tool_parsers import ParsedReply, ToolCallStream, ToolParser


def parse_reply(text: str, reasoning: bool, tools: ToolParser | None,
                functions: Sequence[FunctionDef] = ()) -> tuple[str | None, ParsedReply]:
    """(reasoning, the rest as content and calls) of a finished reply; `tools` None: no calls looked
    for; `functions`: the request's, as the parser reads the calls against them."""
    thought, rest = split_reasoning(text) if reasoning else (None, text)
    return thought, tools.parse(rest, functions) if tools is not None else ParsedReply(rest, [])


@dataclass
class ReplyFilter:
    """One streamed reply, split as a finished one is: the <think> block first (with a reasoning
    parser), then tool calls out of the rest (with tools)."""

    thinking: ReasoningStream | None
    tools: ToolCallStream | None

    @property
    def passes_through(self) -> bool:
        """Neither a reasoning parser nor tools: every delta is content as it is."""
        return self.thinking is None and self.tools is None

    @property
    def called(self) -> bool:
        """Some tool call has gone out."""
        return self.tools is not None and bool(self.tools.calls)

    def push(self, delta: str, finished: bool) -> tuple[str, str, list[DeltaToolCall]]:
        """(reasoning, content) to send now, and the tool calls that are complete."""
        thought, text, calls = "", delta, []
        if self.thinking is not None:
            thought, text = self.thinking.push(text)
            if finished:
                more, rest = self.thinking.finish()
                thought, text = thought + more, text + rest
        if self.tools is not None:
            out = self.tools.push(text)
            text, calls = out.content, out.calls
            if finished:
                out = self.tools.finish()
                text, calls = text + out.content, calls + out.calls
        return thought, text, calls
