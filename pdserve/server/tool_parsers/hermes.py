"""`--tool-call-parser hermes` (the default): the format Qwen models are trained on, as vLLM's
`hermes` parser reads it. Each call is a JSON object in its own block:

    Let me check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block runs from `<tool_call>` to the first `</tool_call>` after it. The content is the text
before the first well-formed call (trailing whitespace dropped); a malformed block before it is
content, text and malformed blocks after it are dropped. No well-formed call: all of it is content.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pdserve.server.markers import partial_marker
from pdserve.server.protocol import FunctionCallOut, FunctionDef
from pdserve.server.tool_parsers.base import ToolCallStream, ToolDelta, ToolParser, parse_call, rstrip_end

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


class HermesStream(ToolCallStream):
    def __init__(self) -> None:
        super().__init__()
        self._find_from = 0  # where the next block's start may be
        self._open: int | None = None  # start of the block whose end has not come yet
        self._end_from = 0  # where its end may be

    def _advance(self, final: bool) -> ToolDelta:
        out = ToolDelta()
        while self._next_block(out):
            pass
        if not self.calls:
            self._release(len(self.text) if final else self._safe_end(), out)
        return out

    def _next_block(self, out: ToolDelta) -> bool:
        """Settle the next complete block, if there is one."""
        text = self.text
        if self._open is None:
            start = text.find(TOOL_CALL_START, self._find_from)
            if start < 0:
                self._find_from = max(self._find_from, len(text) - len(TOOL_CALL_START) + 1)
                return False
            self._open, self._end_from = start, start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, self._end_from)
        if end < 0:
            self._end_from = max(self._end_from, len(text) - len(TOOL_CALL_END) + 1)
            return False
        start, after = self._open, end + len(TOOL_CALL_END)
        self._open, self._find_from = None, after
        function = self._parse_body(text[start + len(TOOL_CALL_START):end])
        if function is None:
            if not self.calls:
                self._release(after, out)  # malformed before any call: content
            return True
        if not self.calls:
            self._release(rstrip_end(text, start, self._sent), out)
        self._emit(function, out)
        return True

    def _parse_body(self, body: str) -> FunctionCallOut | None:
        """The call a block's text (between the markers) holds; None when it is malformed."""
        return parse_call(body, ("arguments",))

    def _safe_end(self) -> int:
        """How far content can go now: not into an open block, a partial start marker, or the
        whitespace before either."""
        end = self._open if self._open is not None else len(self.text) - partial_marker(self.text, TOOL_CALL_START)
        return rstrip_end(self.text, end, self._sent)


class HermesToolParser(ToolParser):
    name = "hermes"
    argument_key = "arguments"

    def stream(self, tools: Sequence[FunctionDef] = ()) -> HermesStream:
        return HermesStream()

    def grammar(self, tools: Sequence[FunctionDef], parallel: bool) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                f"call: {json.dumps(TOOL_CALL_START + chr(10))} body {json.dumps(chr(10) + TOOL_CALL_END)}\n"
                f"body: %json {self.call_schema(tools)}\n")
