"""`POST /v1/chat/completions`: messages through the model's chat template, an assistant reply out."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from pdserve.engine.outputs import StepOutput
from pdserve.model.tokenizer import Tokenizer
from pdserve.server import sse
from pdserve.server.body import parse_body
from pdserve.server.context import get_context
from pdserve.server.errors import APIError
from pdserve.server.inputs import chat_prompt, sampling_params, validate_constraint
from pdserve.server.logprobs import chat_logprobs
from pdserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    FinishReason,
    KVParamsJSON,
    Usage,
)
from pdserve.server.reasoning import ReasoningStream, split_reasoning
from pdserve.server.serving import (
    Started,
    check_model,
    finish_reason,
    kv_params,
    start,
    total_usage,
    usage_of,
    wait_for_end,
)
from pdserve.server.tool_parsers import ParsedReply, ToolCallStream
from pdserve.server.tools import template_tools, tool_constraint


async def create_chat_completion(request: Request) -> Response:
    arrival = time.monotonic()
    ctx = get_context(request)
    ctx.admission.check_open()
    req = await parse_body(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    tools = template_tools(req)
    token_ids = chat_prompt(ctx.llm, req.messages, req.add_generation_prompt, tools, req.chat_template_kwargs,
                            req.add_special_tokens)
    params = sampling_params(req, req.output_limit, (req.top_logprobs or 0) if req.logprobs else None,
                             defaults=ctx.llm.sampling_defaults)
    constraint = tool_constraint(req, ctx.tool_parser)
    if constraint is not None:
        if params.structured_outputs is not None:
            raise APIError(400, "tool_choice 'required' or a named function constrains the output already: "
                           "send it without another output constraint", code="invalid_value", param="tool_choice")
        params = dataclasses.replace(params, structured_outputs=constraint)
    await validate_constraint(ctx.llm, params, req)
    started = start(request, ctx, req, token_ids, params, "chatcmpl", arrival)
    reasoning = ctx.settings.reasoning_parser is not None
    if req.stream:
        filters = [_ReplyFilter(ReasoningStream() if reasoning else None,
                                ctx.tool_parser.stream() if tools is not None else None)
                   for _ in started.generations]
        stream = _stream(req, started, ctx.llm.tokenizer, filters)
        return sse.GenerationStream(stream, started.abort, {})
    results = await wait_for_end(request, started)
    choices = []
    for i, r in enumerate(results):
        thought, text = split_reasoning(r.text) if reasoning else (None, r.text)
        reply = ctx.tool_parser.parse(text) if tools is not None else ParsedReply(text, [])
        choices.append(ChatChoice(
            index=i, message=AssistantMessage(content=reply.content, reasoning_content=thought, tool_calls=reply.calls),
            finish_reason=_reason(finish_reason(r.final), bool(reply.calls)),
            logprobs=chat_logprobs(ctx.llm.tokenizer, r.logprobs) if req.logprobs else None,
        ))
    body = ChatCompletionResponse(
        id=started.response_id,
        created=started.created,
        model=started.model,
        choices=choices,
        usage=total_usage([r.final for r in results]),
        kv_transfer_params=kv_params(results[0].final),
    )
    return Response(body.model_dump_json(), media_type="application/json")


@dataclass
class _ReplyFilter:
    """One streamed choice, as the non-streamed reply is split: the <think> block first (with a
    reasoning parser), then tool calls out of the rest (with tools)."""

    thinking: ReasoningStream | None
    tools: ToolCallStream | None

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


def _reason(reason: FinishReason | None, called: bool) -> FinishReason | None:
    return "tool_calls" if called and reason == "stop" else reason


async def _stream(
    req: ChatCompletionRequest, s: Started, tok: Tokenizer, filters: list[_ReplyFilter]
) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None, kv: KVParamsJSON | None = None) -> bytes:
        return sse.event(
            ChatCompletionChunk(
                id=s.response_id,
                created=s.created,
                model=s.model,
                choices=choices,
                usage=usage,
                kv_transfer_params=kv,
            )
        )

    # Each choice's first chunk announces the role, as OpenAI's does.
    n = len(s.generations)
    for i in range(n):
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    finals: list[StepOutput] = []
    async for i, out in s.outputs():
        if out.finish_reason == "error":
            yield sse.error_event(out.error or "the engine failed this request")
            break
        if out.new_token_ids or out.new_text or out.finished:
            running = usage_of(out) if req.include_usage and req.continuous_usage else None
            kv = kv_params(out) if out.finished else None
            thought, text, calls = filters[i].push(out.new_text, out.finished)
            reason = _reason(finish_reason(out), filters[i].called)
            delta = DeltaMessage(content=text, reasoning_content=thought or None, tool_calls=calls or None)
            lps = chat_logprobs(tok, out.logprobs or ()) if req.logprobs else None
            choice = ChatChunkChoice(index=i, delta=delta, logprobs=lps, finish_reason=reason)
            yield chunk([choice], running, kv)
        if out.finished:
            finals.append(out)
            if req.include_usage and len(finals) == n:
                yield chunk([], total_usage(finals))
    yield sse.DONE
