"""Tool-call formats, one module each, behind `pdserve serve --tool-call-parser NAME` (vLLM's flag
and names): `hermes` (the default; Qwen's `<tool_call>` blocks), `llama3_json` (Llama 3.1 / 3.2
JSON calls), `mistral` (Mistral / Mixtral's `[TOOL_CALLS]`), `pythonic` (Llama 3.2 / 4's Python
list of calls) and `qwen3_coder` (Qwen3-Coder's XML-like blocks). The interface and the streaming
contract they share: base.py."""

from __future__ import annotations

from pdserve.server.tool_parsers.base import ParsedReply, ToolCallStream, ToolDelta, ToolParser
from pdserve.server.tool_parsers.hermes import HermesToolParser
from pdserve.server.tool_parsers.llama3_json import Llama3JsonToolParser
from pdserve.server.tool_parsers.mistral import MistralToolParser
from pdserve.server.tool_parsers.pythonic import PythonicToolParser
from pdserve.server.tool_parsers.qwen3_coder import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (
    HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser, Qwen3CoderToolParser)}


def make_tool_parser(name: str) -> ToolParser:
    """The parser of that --tool-call-parser name (ValueError naming the known ones otherwise)."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(TOOL_PARSERS)}") from None


__all__ = ["TOOL_PARSERS", "ParsedReply", "ToolCallStream", "ToolDelta", "ToolParser", "make_tool_parser"]
