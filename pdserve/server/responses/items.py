"""A response's input items as `GET /v1/responses/{id}/input_items` lists them, in the shapes of the
`openai` package's `ResponseItem`: the conversation the response was made from — the earlier turns'
input and output items (`previous_response_id`), then its own input — with `instructions` left out.
Each item has an id: the one the client gave it, else one made when the response was created (an
earlier response's output items keep theirs). The list object pages them as OpenAI's does."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Literal

from pdserve.server.responses.objects import (
    FunctionCall,
    OutputMessage,
    OutputText,
    Reasoning,
    WireModel,
)
from pdserve.server.responses.request import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    MessageItem,
    TextPart,
)


class InputText(WireModel):
    type: Literal["input_text"] = "input_text"
    text: str


class InputMessage(WireModel):
    """A user, system or developer message (an assistant's is an `OutputMessage`)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer"]
    content: list[InputText]
    status: Literal["completed"] = "completed"


class FunctionCallOutput(WireModel):
    id: str
    type: Literal["function_call_output"] = "function_call_output"
    call_id: str
    output: str
    status: Literal["completed"] = "completed"


ListedItem = InputMessage | OutputMessage | FunctionCall | FunctionCallOutput | Reasoning


class ItemList(WireModel):
    """One page of input items (`object: "list"`); `first_id` and `last_id` are null on an empty page."""

    object: Literal["list"] = "list"
    data: list[ListedItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _id(given: str | None, prefix: str) -> str:
    return given if given else f"{prefix}_{uuid.uuid4().hex}"


def _parts(content: str | list[TextPart]) -> list[str]:
    return [content] if isinstance(content, str) else [p.text for p in content]


def listed(items: Iterable[InputItem]) -> list[ListedItem]:
    """A request's input items as they are listed (and stored), each with its id."""
    out: list[ListedItem] = []
    for item in items:
        if isinstance(item, MessageItem) and item.role == "assistant":
            out.append(
                OutputMessage(
                    id=_id(item.id, "msg"),
                    status="completed",
                    content=[OutputText(text=t) for t in _parts(item.content)],
                )
            )
        elif isinstance(item, MessageItem):
            out.append(
                InputMessage(
                    id=_id(item.id, "msg"), role=item.role, content=[InputText(text=t) for t in _parts(item.content)]
                )
            )
        elif isinstance(item, FunctionCallItem):
            out.append(
                FunctionCall(
                    id=_id(item.id, "fc"),
                    call_id=item.call_id,
                    name=item.name,
                    arguments=item.arguments,
                    status="completed",
                )
            )
        elif isinstance(item, FunctionCallOutputItem):
            out.append(FunctionCallOutput(id=_id(item.id, "fco"), call_id=item.call_id, output=item.text))
        else:
            out.append(Reasoning(id=_id(item.id, "rs"), content=[], status="completed"))
    return out
