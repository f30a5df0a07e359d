"""`POST /v1/chat/completions`: messages through the model's chat template, an assistant reply out."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.tokenizer import Tokenizer
from pdserve.server import sse
from pdserve.server.beam_serving import check_beam_search, start_beam_search
from pdserve.server.body import parse_body
from pdserve.server.context import ServerContext, get_context
from pdserve.server.errors import APIError
from pdserve.server.inputs import chat_prompt, chat_template, sampling_params, truncated, validate_constraint
from pdserve.server.logprobs import chat_logprobs, prompt_logprobs
from pdserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    FinishReason,
    KVParamsJSON,
    Usage,
)
from pdserve.server.reasoning import ReasoningStream
from pdserve.server.reply import ReplyFilter, parse_reply
from pdserve.server.serving import (
    Choices,
    check_model,
    finish_reason,
    kv_params,
    start,
    total_usage,
    usage_of,
    wait_for_end,
)
from pdserve.server.tools import template_tools, tool_constraint, tool_functions


@dataclass(frozen=True)
class ChatInputs:
    """What the engine takes for a chat request."""

    token_ids: list[int]
    params: SamplingParams  # a tool_choice constraint included, its grammar compiled once
    tools: list[dict[str, Any]] | None  # as the template got them; None: no tool calls are looked for


async def chat_inputs(ctx: ServerContext, req: ChatCompletionRequest) -> ChatInputs:
    """The prompt (messages and tools through the chat template) and the sampling params of `req`;
    APIError 400 for anything the engine would refuse."""
    tools = template_tools(req)
    template = chat_template(ctx.settings, req.chat_template, req.chat_template_kwargs)
    rendered = chat_prompt(ctx.llm, req.messages, req.add_generation_prompt, tools, req.chat_template_kwargs,
                           req.add_special_tokens, template, req.continue_final_message)
    params = sampling_params(req, req.output_limit, (req.top_logprobs or 0) if req.logprobs else None,
                             req.prompt_logprobs, defaults=ctx.llm.sampling_defaults)
    token_ids = truncated(ctx.llm, rendered, params)  # vLLM's truncate_prompt_tokens: after the template
    if tools is not None and ctx.tool_parser.needs_special_tokens:  # its call marker must reach the parser
        params = dataclasses.replace(params, skip_special_tokens=False)
    constraint = tool_constraint(req, ctx.tool_parser)
    if constraint is not None:
        if params.structured_outputs is not None:
            raise APIError(400, "tool_choice 'required' or a named function constrains the output already: "
                           "send it without another output constraint", code="invalid_value", param="tool_choice")
        params = dataclasses.replace(params, structured_outputs=constraint)
    if req.use_beam_search:
        check_beam_search(req, params)
    await validate_constraint(ctx.llm, params, req)
    return ChatInputs(token_ids, params, tools)


async def create_chat_completion(request: Request) -> Response:
    arrival = time.monotonic()
    ctx = get_context(request)
    ctx.admission.check_open()
    req = await parse_body(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    inputs = await chat_inputs(ctx, req)
    tools = inputs.tools
    started: Choices = (
        start_beam_search(request, ctx, req, [inputs.token_ids], req.output_limit, "chatcmpl", arrival,
                          inputs.params.logprobs, req.prompt_logprobs)
        if req.use_beam_search else start(request, ctx, req, inputs.token_ids, inputs.params, "chatcmpl", arrival)
    )
    reasoning = ctx.settings.reasoning_parser is not None
    parser = ctx.tool_parser if tools is not None else None
    if req.stream:
        filters = [ReplyFilter(ReasoningStream() if reasoning else None,
                               parser.stream(tool_functions(req)) if parser else None)
                   for _ in range(started.num_choices)]
        stream = _stream(req, started, ctx.llm.tokenizer, filters, inputs.token_ids)
        return sse.GenerationStream(stream, started.abort, {})
    results = await wait_for_end(request, started)
    as_ids = bool(req.return_tokens_as_token_ids)
    choices = []
    for i, r in enumerate(results):
        thought, reply = parse_reply(r.text, reasoning, parser, tool_functions(req))
        choices.append(ChatChoice(
            index=i, message=AssistantMessage(content=reply.content, reasoning_content=thought, tool_calls=reply.calls),
            finish_reason=_reason(finish_reason(r.final), bool(reply.calls)),
            logprobs=chat_logprobs(ctx.llm.tokenizer, r.logprobs, as_ids) if req.logprobs else None,
            token_ids=r.token_ids if req.return_token_ids else None,
        ))
    plps = results[0].prompt_logprobs if req.prompt_logprobs is not None else None
    body = ChatCompletionResponse(
        id=started.response_id,
        created=started.created,
        model=started.model,
        choices=choices,
        usage=total_usage([r.final for r in results]),
        kv_transfer_params=kv_params(results[0].final),
        prompt_token_ids=inputs.token_ids if req.return_token_ids else None,
        prompt_logprobs=None if plps is None else prompt_logprobs(ctx.llm.tokenizer, plps, req.prompt_logprobs or 0),
    )
    return Response(body.model_dump_json(), media_type="application/json")


def _reason(reason: FinishReason | None, called: bool) -> FinishReason | None:
    return "tool_calls" if called and reason == "stop" else reason


async def _stream(
    req: ChatCompletionRequest, s: Choices, tok: Tokenizer, filters: list[ReplyFilter], prompt_ids: list[int]
) -> AsyncIterator[bytes]:
    def chunk(
        choices: list[ChatChunkChoice], usage: Usage | None = None, kv: KVParamsJSON | None = None,
        prompt: list[int] | None = None,
    ) -> bytes:
        return sse.event(
            ChatCompletionChunk(
                id=s.response_id,
                created=s.created,
                model=s.model,
                choices=choices,
                usage=usage,
                kv_transfer_params=kv,
                prompt_token_ids=prompt,
            )
        )

    # Each choice's first chunk announces the role, as OpenAI's does; the very first carries the
    # prompt's token ids (return_token_ids), as vLLM's.
    n = s.num_choices
    for i in range(n):
        prompt = prompt_ids if i == 0 and req.return_token_ids else None
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))], prompt=prompt)
    finals: list[StepOutput] = []
    # As in completions: the chunks that differ in their content alone come from a template.
    plain = not req.logprobs and not req.return_token_ids and not (req.include_usage and req.continuous_usage)
    slots: dict[int, sse.TextSlot] = {}
    async for i, out in s.outputs():
        if plain and not out.finished and filters[i].passes_through:
            if out.new_token_ids or out.new_text:
                if i not in slots:
                    slots[i] = sse.TextSlot(lambda text, i=i: chunk([ChatChunkChoice(
                        index=i, delta=DeltaMessage(content=text, reasoning_content=None, tool_calls=None),
                        logprobs=None, finish_reason=None, token_ids=None)]))
                yield slots[i](out.new_text)
            continue
        if out.finish_reason == "error":
            yield sse.error_event(out.error or "the engine failed this request")
            break
        if out.new_token_ids or out.new_text or out.finished:
            running = usage_of(out) if req.include_usage and req.continuous_usage else None
            kv = kv_params(out) if out.finished else None
            thought, text, calls = filters[i].push(out.new_text, out.finished)
            reason = _reason(finish_reason(out), filters[i].called)
            delta = DeltaMessage(content=text, reasoning_content=thought or None, tool_calls=calls or None)
            lps = chat_logprobs(tok, out.logprobs or (), bool(req.return_tokens_as_token_ids)) if req.logprobs else None
            ids = list(out.new_token_ids) if req.return_token_ids else None
            choice = ChatChunkChoice(index=i, delta=delta, logprobs=lps, finish_reason=reason, token_ids=ids)
            yield chunk([choice], running, kv)
        if out.finished:
            finals.append(out)
            if req.include_usage and len(finals) == n:
                yield chunk([], total_usage(finals))
    yield sse.DONE
