"""A Responses request as the chat request it amounts to: `instructions` and the conversation's
items become chat messages, the other fields chat's (so the prompt, the sampling, tools and
structured outputs go through the very code chat completions use).

Items to messages: a message keeps its role (`developer` becomes `system`: chat templates know
that one, and OpenAI treats them alike) and its text (parts joined by newlines); an assistant's
message and the function calls right after it become one assistant turn with `tool_calls`; a
`function_call_output` a `tool` message naming its call; reasoning items are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import JsonValue, ValidationError

from pdserve.server.errors import APIError, from_pydantic
from pdserve.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCallIn,
    FunctionDef,
    NamedFunction,
    NamedToolChoice,
    Tool,
    ToolCallIn,
)
from pdserve.server.responses.items import FunctionCallOutput, InputMessage, ListedItem
from pdserve.server.responses.objects import FunctionCall, OutputMessage
from pdserve.server.responses.request import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    InputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    TextPart,
)


def chat_request(req: ResponsesRequest, items: Sequence[InputItem]) -> ChatCompletionRequest:
    """The chat request of `req` whose conversation is `items` (an earlier one's, then req's input)."""
    system = [ChatMessage(role="system", content=req.instructions)] if req.instructions is not None else []
    choice = req.effective_tool_choice
    tools = [
        Tool(type="function", function=FunctionDef.model_validate(t.model_dump(exclude={"type"})))
        for t in req.tools or ()
    ]
    try:
        return ChatCompletionRequest(
            model=req.model,
            messages=system + messages(items),
            max_completion_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty,
            stop=req.stop,
            ignore_eos=req.ignore_eos,
            tools=tools or None,
            parallel_tool_calls=req.parallel_tool_calls,
            tool_choice=NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
            if isinstance(choice, FunctionChoice)
            else choice,
            response_format=req.text.format.response_format if req.text is not None else None,
            structured_outputs=req.structured_outputs,
            chat_template_kwargs=_template_kwargs(req),
            kv_transfer_params=req.kv_transfer_params,
            cache_salt=req.cache_salt,
        )
    except ValidationError as e:
        raise from_pydantic(e) from None
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _template_kwargs(req: ResponsesRequest) -> dict[str, JsonValue] | None:
    """The request's chat_template_kwargs, with reasoning.effort as `reasoning_effort` (vLLM's)."""
    effort = req.reasoning.effort if req.reasoning is not None else None
    if effort is None:
        return req.chat_template_kwargs
    return {"reasoning_effort": effort, **(req.chat_template_kwargs or {})}


def messages(items: Iterable[InputItem]) -> list[ChatMessage]:
    """The chat messages of a conversation's items."""
    out: list[ChatMessage] = []
    texts: list[str] = []  # the assistant turn being put together
    calls: list[ToolCallIn] = []

    def flush() -> None:
        if texts or calls:
            out.append(
                ChatMessage(
                    role="assistant", content="\n".join(texts) if texts else None, tool_calls=list(calls) or None
                )
            )
            texts.clear()
            calls.clear()

    for item in items:
        if isinstance(item, MessageItem) and item.role == "assistant":
            if calls:  # text after calls starts another turn
                flush()
            texts.append(item.text)
        elif isinstance(item, FunctionCallItem):
            calls.append(ToolCallIn(id=item.call_id, function=FunctionCallIn(name=item.name, arguments=item.arguments)))
        elif isinstance(item, MessageItem):
            flush()
            out.append(ChatMessage(role="system" if item.role == "developer" else item.role, content=item.text))
        elif isinstance(item, FunctionCallOutputItem):
            flush()
            out.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=item.text))
    flush()
    return out


def as_input(listed: Iterable[ListedItem]) -> list[InputItem]:
    """Listed items (a stored conversation, a response's output) as the input items a client would
    send: the same chat messages, hence the same prompt."""
    items: list[InputItem] = []
    for o in listed:
        if isinstance(o, OutputMessage):
            parts = [TextPart(type="output_text", text=p.text) for p in o.content]
            items.append(MessageItem(role="assistant", content=parts, id=o.id))
        elif isinstance(o, InputMessage):
            parts = [TextPart(type="input_text", text=p.text) for p in o.content]
            items.append(MessageItem(role=o.role, content=parts, id=o.id))
        elif isinstance(o, FunctionCall):
            items.append(
                FunctionCallItem(type="function_call", call_id=o.call_id, name=o.name, arguments=o.arguments, id=o.id)
            )
        elif isinstance(o, FunctionCallOutput):
            items.append(
                FunctionCallOutputItem(type="function_call_output", call_id=o.call_id, output=o.output, id=o.id)
            )
        else:
            items.append(ReasoningItem(type="reasoning", id=o.id))
    return items
