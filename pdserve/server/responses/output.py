"""One response's output, assembled as its reply is read — reasoning, then content, then whole tool
calls — with the stream events each step makes. A non-streamed response is assembled the same way
from the finished reply (its events dropped), so both carry the same items.

Items: a `reasoning` item when the reply has a (non-empty) think block; a `message` when there is
content, or when there is nothing else to show (an empty one: `output_text` is then ""); a
`function_call` per call. Each is "completed", except that the item still open when
max_output_tokens cut the reply (or a cancel stopped it) is "incomplete".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from pdserve.server.protocol import FunctionCallOut, KVParamsJSON
from pdserve.server.responses.events import (
    AnyEvent,
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ErrorEvent,
    LifecycleEvent,
    OutputItemEvent,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from pdserve.server.responses.objects import (
    FunctionCall,
    IncompleteDetails,
    ItemStatus,
    OutputItem,
    OutputMessage,
    OutputText,
    Reasoning,
    ReasoningText,
    ResponseError,
    ResponseObject,
    ResponseStatus,
    ResponseUsage,
)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Open:
    """The reasoning or message item being streamed."""

    kind: Literal["reasoning", "message"]
    id: str
    index: int
    text: str = ""

    def item(self, status: ItemStatus) -> OutputItem:
        """The item as announced ("in_progress": no content yet) or as closed."""
        started = status == "in_progress"
        if self.kind == "message":
            return OutputMessage(id=self.id, status=status, content=[] if started else [OutputText(text=self.text)])
        return Reasoning(id=self.id, status=status, content=[] if started else [ReasoningText(text=self.text)])


class OutputAssembler:
    """Feed a reply in order (`reasoning`, `content`, `call`), then `finish` (or `fail`); each
    returns its events. `response` is the Response: "in_progress" until finished."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.items: list[OutputItem] = []  # the closed items
        self.reasoning_text = ""
        self._open: _Open | None = None
        self._seq = 0

    def _n(self) -> int:
        self._seq += 1
        return self._seq - 1

    def begin(self) -> list[AnyEvent]:
        """`response.created`, then `response.in_progress` (a queued response: `response.queued`)."""
        queued = self.response.status == "queued"
        second: Literal["response.queued", "response.in_progress"] = (
            "response.queued" if queued else "response.in_progress"
        )
        return [
            LifecycleEvent(type="response.created", sequence_number=self._n(), response=self.response),
            LifecycleEvent(type=second, sequence_number=self._n(), response=self.response),
        ]

    def progress(self) -> list[AnyEvent]:
        """The engine has begun (its first output): a queued response is now in progress."""
        if self.response.status != "queued":
            return []
        self.response = self.response.model_copy(update={"status": "in_progress"})
        return [LifecycleEvent(type="response.in_progress", sequence_number=self._n(), response=self.response)]

    def reasoning(self, delta: str) -> list[AnyEvent]:
        if not delta:
            return []
        events = self._enter("reasoning")
        assert self._open is not None
        self._open.text += delta
        self.reasoning_text += delta
        events.append(
            ReasoningDeltaEvent(
                sequence_number=self._n(), item_id=self._open.id, output_index=self._open.index, delta=delta
            )
        )
        return events

    def content(self, delta: str) -> list[AnyEvent]:
        if not delta:
            return []
        events = self._enter("message")
        assert self._open is not None
        self._open.text += delta
        events.append(
            TextDeltaEvent(sequence_number=self._n(), item_id=self._open.id, output_index=self._open.index, delta=delta)
        )
        return events

    def call(self, function: FunctionCallOut) -> list[AnyEvent]:
        """A whole call: its arguments go out in one delta."""
        events = self._close("completed")
        index, item = (
            len(self.items),
            FunctionCall(
                id=_id("fc"), call_id=_id("call"), name=function.name, arguments=function.arguments, status="completed"
            ),
        )
        started = item.model_copy(update={"arguments": "", "status": "in_progress"})
        events += [
            OutputItemEvent(
                type="response.output_item.added", sequence_number=self._n(), output_index=index, item=started
            ),
            ArgumentsDeltaEvent(sequence_number=self._n(), item_id=item.id, output_index=index, delta=item.arguments),
            ArgumentsDoneEvent(
                sequence_number=self._n(), item_id=item.id, output_index=index, name=item.name, arguments=item.arguments
            ),
            OutputItemEvent(type="response.output_item.done", sequence_number=self._n(), output_index=index, item=item),
        ]
        self.items.append(item)
        return events

    def finish(self, status: ResponseStatus, usage: ResponseUsage, kv: KVParamsJSON | None) -> list[AnyEvent]:
        """The end: close what is open, settle the Response, `response.completed`."""
        item_status: ItemStatus = "incomplete" if status in ("incomplete", "cancelled") else "completed"
        events = self._close(item_status)
        if not any(isinstance(i, OutputMessage | FunctionCall) for i in self.items):
            events += self._enter("message") + self._close(item_status)
        self.response = self.response.model_copy(
            update={
                "status": status,
                "output": list(self.items),
                "usage": usage,
                "kv_transfer_params": kv,
                "incomplete_details": IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            }
        )
        return events + [LifecycleEvent(type="response.completed", sequence_number=self._n(), response=self.response)]

    def fail(self, message: str) -> list[AnyEvent]:
        """The engine failed the request: `error`, then `response.failed`."""
        self.response = self.response.model_copy(
            update={"status": "failed", "output": list(self.items), "error": ResponseError(message=message)}
        )
        return [
            ErrorEvent(sequence_number=self._n(), code="server_error", message=message),
            LifecycleEvent(type="response.failed", sequence_number=self._n(), response=self.response),
        ]

    def _enter(self, kind: Literal["reasoning", "message"]) -> list[AnyEvent]:
        """Open an item of `kind` unless it is the one open (closing another)."""
        if self._open is not None and self._open.kind == kind:
            return []
        events = self._close("completed")
        opened = self._open = _Open(kind, _id("msg" if kind == "message" else "rs"), len(self.items))
        part = OutputText(text="") if kind == "message" else ReasoningText(text="")
        return events + [
            OutputItemEvent(
                type="response.output_item.added",
                sequence_number=self._n(),
                output_index=opened.index,
                item=opened.item("in_progress"),
            ),
            ContentPartEvent(
                type="response.content_part.added",
                sequence_number=self._n(),
                item_id=opened.id,
                output_index=opened.index,
                part=part,
            ),
        ]

    def _close(self, status: ItemStatus) -> list[AnyEvent]:
        """Close the open item, if any."""
        opened, self._open = self._open, None
        if opened is None:
            return []
        text, item, at = opened.text, opened.item(status), opened.index
        done: AnyEvent
        part: OutputText | ReasoningText
        if opened.kind == "message":
            done = TextDoneEvent(sequence_number=self._n(), item_id=opened.id, output_index=at, text=text)
            part = OutputText(text=text)
        else:
            done = ReasoningDoneEvent(sequence_number=self._n(), item_id=opened.id, output_index=at, text=text)
            part = ReasoningText(text=text)
        self.items.append(item)
        return [
            done,
            ContentPartEvent(
                type="response.content_part.done",
                sequence_number=self._n(),
                item_id=opened.id,
                output_index=at,
                part=part,
            ),
            OutputItemEvent(type="response.output_item.done", sequence_number=self._n(), output_index=at, item=item),
        ]
