"""`POST /v1/responses` and `GET /v1/responses/{response_id}`: OpenAI's Responses API for text
models, as vLLM serves it. A request becomes the chat request it amounts to (conversation.py), so
the prompt, the sampling, tools and reasoning go through chat's code; the reply becomes output
items (output.py), streamed as the Responses API's events or answered whole; with `store` (the
default) the response is kept for GET and `previous_response_id` (store.py: bounded, in memory).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.tokenizer import Tokenizer
from pdserve.server import sse
from pdserve.server.body import read_body
from pdserve.server.chat import chat_inputs
from pdserve.server.context import ServerContext, get_context
from pdserve.server.errors import APIError, validation_error
from pdserve.server.reasoning import ReasoningStream
from pdserve.server.reply import ReplyFilter, parse_reply
from pdserve.server.responses.conversation import as_input, chat_request
from pdserve.server.responses.events import AnyEvent, frame
from pdserve.server.responses.objects import ResponseObject, ResponseStatus, ResponseUsage
from pdserve.server.responses.output import OutputAssembler
from pdserve.server.responses.request import InputItem, ResponsesRequest, TextConfig, client_errors
from pdserve.server.responses.store import ResponseStore, StoredResponse
from pdserve.server.serving import Started, check_model, kv_params, start, wait_for_end

# chat's field names in the errors of the code this endpoint shares with it -> this API's
_PARAMS = {"messages": "input", "prompt": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


async def _parse(request: Request, limit: int) -> ResponsesRequest:
    body = await read_body(request, limit)
    if not body.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return ResponsesRequest.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(client_errors(e.errors())) from None


def _conversation(ctx: ServerContext, req: ResponsesRequest) -> list[InputItem]:
    """The earlier turns' items (those of `previous_response_id`), then this request's input."""
    if req.previous_response_id is None:
        return req.items
    stored = ctx.responses.get(req.previous_response_id)
    if stored is None:
        raise APIError(400, f"previous response '{req.previous_response_id}' is not stored on this server (never "
                       "made here, made with store: false, or forgotten)", code="previous_response_not_found",
                       param="previous_response_id")
    return [*stored.conversation, *req.items]


def _status(final: StepOutput) -> ResponseStatus:
    match final.finish_reason:
        case "length":  # max_output_tokens (or the context) cut the reply
            return "incomplete"
        case "abort":
            return "cancelled"
        case _:
            return "completed"


def _skeleton(req: ResponsesRequest, started: Started, params: SamplingParams) -> ResponseObject:
    """The Response before any output: what the request asked for, as it is echoed."""
    return ResponseObject(
        id=f"resp_{uuid.uuid4().hex}", created_at=started.created, status="in_progress", model=started.model,
        output=[], instructions=req.instructions, max_output_tokens=req.max_output_tokens,
        parallel_tool_calls=req.parallel_tool_calls, previous_response_id=req.previous_response_id,
        reasoning=req.reasoning, temperature=params.temperature, top_p=params.top_p, text=req.text or TextConfig(),
        tool_choice=req.effective_tool_choice, tools=req.tools or [], user=req.user, metadata=req.metadata or {},
    )


@dataclass(frozen=True)
class _Finish:
    """What the end of a response needs: token counts, and where to keep it."""

    tokenizer: Tokenizer
    store: ResponseStore | None  # None: not kept
    conversation: list[InputItem]

    def __call__(self, asm: OutputAssembler, final: StepOutput) -> list[AnyEvent]:
        """Settle the response (status, usage), keep it if asked; the events of its end."""
        status = _status(final)
        thought = len(self.tokenizer.encode(asm.reasoning_text)) if asm.reasoning_text else 0
        usage = ResponseUsage.of(final.num_prompt_tokens, final.num_output_tokens, final.num_cached_tokens,
                                 min(thought, final.num_output_tokens))
        events = asm.finish(status, usage, kv_params(final))
        if self.store is not None and status != "cancelled":
            self.store.put(StoredResponse(asm.response, [*self.conversation, *as_input(asm.response.output)]))
        return events


async def create_response(request: Request) -> Response:
    arrival = time.monotonic()
    ctx = get_context(request)
    ctx.admission.check_open()
    req = await _parse(request, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    conversation = _conversation(ctx, req)
    try:
        chat = chat_request(req, conversation)
        inputs = await chat_inputs(ctx, chat)
        started = start(request, ctx, chat, inputs.token_ids, inputs.params, "resp", arrival)
    except APIError as e:
        e.param = _PARAMS.get(e.param or "", e.param)
        raise
    prefill_half = (req.kv_transfer_params or {}).get("do_remote_decode") is True  # a proxy's: never kept
    keep = req.store is not False and not prefill_half
    finish = _Finish(ctx.llm.tokenizer, ctx.responses if keep else None, conversation)
    asm = OutputAssembler(_skeleton(req, started, inputs.params))
    reasoning = ctx.settings.reasoning_parser is not None
    parser = ctx.tool_parser if inputs.tools is not None else None
    if req.stream:
        reply = ReplyFilter(ReasoningStream() if reasoning else None, parser.stream() if parser else None)
        return sse.GenerationStream(_stream(started.generations[0].outputs(), asm, reply, finish), started.abort, {})
    (result,) = await wait_for_end(request, started)
    thought, parsed = parse_reply(result.text, reasoning, parser)
    asm.reasoning(thought or "")
    asm.content(parsed.content or "")
    for call in parsed.calls:
        asm.call(call.function)
    finish(asm, result.final)
    return Response(asm.response.json_bytes(), media_type="application/json")


async def _stream(
    outputs: AsyncIterator[StepOutput], asm: OutputAssembler, reply: ReplyFilter, finish: _Finish
) -> AsyncIterator[bytes]:
    for event in asm.begin():
        yield frame(event)
    async for out in outputs:
        if out.finish_reason == "error":
            for event in asm.fail(out.error or "the engine failed this request"):
                yield frame(event)
            return
        thought, text, calls = reply.push(out.new_text, out.finished)
        events = asm.reasoning(thought) + asm.content(text)
        for call in calls:
            events += asm.call(call.function)
        if out.finished:
            events += finish(asm, out)
        for event in events:
            yield frame(event)


async def retrieve_response(request: Request) -> Response:
    """`GET /v1/responses/{response_id}`: a stored response, or a 404."""
    ctx = get_context(request)
    response_id = request.path_params["response_id"]
    stored = ctx.responses.get(response_id)
    if stored is None:
        raise APIError(404, f"no response '{response_id}' is stored on this server (never made here, made with "
                       "store: false, or forgotten)", code="response_not_found", param="response_id")
    return Response(stored.response.json_bytes(), media_type="application/json")
