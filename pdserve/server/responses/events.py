"""The server-sent events of a streamed response, in the shapes of the `openai` package's
`types/responses/*_event.py`; each is framed `event: <type>` / `data: <json>` as OpenAI's are.

A stream is: `response.created`, `response.in_progress` (in the background: `response.queued`, then
`response.in_progress` at the engine's first output); per output item `response.output_item.added`,
then for a message `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done` (a reasoning item the same with
`response.reasoning_text.*`), for a function call `response.function_call_arguments.delta` and
`.done`; then `response.output_item.done`; last `response.completed` (its response's status says
"incomplete" when max_output_tokens cut it, as vLLM sends it, "cancelled" when a background one was
cancelled), or `error` and `response.failed`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import JsonValue

from pdserve.server.responses.objects import OutputItem, OutputText, ReasoningText, ResponseObject, WireModel


class Event(WireModel):
    sequence_number: int


class LifecycleEvent(Event):
    type: Literal[
        "response.created", "response.queued", "response.in_progress", "response.completed", "response.failed"
    ]
    response: ResponseObject


class OutputItemEvent(Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class _ContentEvent(Event):
    """An event about content part `content_index` of output item `output_index` (`type` first on
    the wire, as each subclass narrows it)."""

    type: str
    item_id: str
    output_index: int
    content_index: int = 0


class ContentPartEvent(_ContentEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    part: OutputText | ReasoningText


class TextDeltaEvent(_ContentEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str
    logprobs: list[JsonValue] = []


class TextDoneEvent(_ContentEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str
    logprobs: list[JsonValue] = []


class ReasoningDeltaEvent(_ContentEvent):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    delta: str


class ReasoningDoneEvent(_ContentEvent):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    text: str


class ArgumentsDeltaEvent(Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(Event):
    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None = None


AnyEvent = (
    LifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ReasoningDeltaEvent
    | ReasoningDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
    | ErrorEvent
)


def frame(event: AnyEvent) -> bytes:
    """One SSE event."""
    return b"event: " + event.type.encode() + b"\ndata: " + event.model_dump_json(by_alias=True).encode() + b"\n\n"
