"""Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`) on the request side: what the chat
template gets, and the output constraint of tool_choice "required" / a named function.

The chat template renders the tools into the prompt. "required" or a named function constrains
the output to calls in the format of the server's `--tool-call-parser` (a Lark grammar whose call
body is the arguments' JSON schema, enforced by engine/structured.py); "auto" leaves the model free.
Either way the reply is read by that parser (server/tool_parsers/): its well-formed calls become
`tool_calls`, the text before the first one the content. Streamed, content goes out as it comes
and each call goes out whole, in the chunk in which its text is complete and parses (never a call
that later turns out malformed or cut off): the contract is in server/tool_parsers/base.py.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.sampling_params import StructuredOutputs
from pdserve.server.protocol import ChatCompletionRequest, FunctionDef, NamedToolChoice
from pdserve.server.tool_parsers import ToolParser


def template_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them (OpenAI's shape), or None."""
    if not req.tools or req.effective_tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def tool_functions(req: ChatCompletionRequest) -> list[FunctionDef]:
    """The request's functions, as its reply's calls are read against them (some formats type the
    arguments by the functions' schemas)."""
    return [t.function for t in req.tools or ()]


def tool_constraint(req: ChatCompletionRequest, parser: ToolParser) -> StructuredOutputs | None:
    """For tool_choice "required" or a named function: a grammar allowing only tool calls (of the
    named function; one or, with parallel_tool_calls, several of any for "required")."""
    choice = req.effective_tool_choice
    if not req.tools or choice in ("none", "auto"):
        return None
    if isinstance(choice, NamedToolChoice):
        tools = [t.function for t in req.tools if t.function.name == choice.function.name]
        return StructuredOutputs(grammar=parser.grammar(tools, parallel=False))
    return StructuredOutputs(grammar=parser.grammar([t.function for t in req.tools], req.parallel_tool_calls))
