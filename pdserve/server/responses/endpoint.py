"""`POST /v1/responses`: OpenAI's Responses API for text models, as vLLM serves it. A request becomes
the chat request it amounts to (conversation.py), so the prompt, the sampling, tools and reasoning go
through chat's code; the reply becomes output items (output.py, run.py), streamed as the Responses
API's events or answered whole; with `store` (the default) the response is kept for GET and
`previous_response_id` (store.py: bounded, in memory). With `background` the answer comes at once
and the generation goes on in the server (background.py); the other routes are in manage.py and
input_items.py.
"""

from __future__ import annotations

import time
import uuid

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pdserve.engine.sampling_params import SamplingParams
from pdserve.server import sse
from pdserve.server.body import read_body
from pdserve.server.chat import chat_inputs
from pdserve.server.context import ServerContext, get_context
from pdserve.server.errors import APIError, validation_error
from pdserve.server.reasoning import ReasoningStream
from pdserve.server.reply import ReplyFilter, parse_reply
from pdserve.server.responses.background import BackgroundRun
from pdserve.server.responses.conversation import as_input, chat_request
from pdserve.server.responses.event_log import EventLog
from pdserve.server.responses.events import frame
from pdserve.server.responses.items import ListedItem, listed
from pdserve.server.responses.objects import ResponseObject
from pdserve.server.responses.output import OutputAssembler
from pdserve.server.responses.request import ResponsesRequest, TextConfig, client_errors
from pdserve.server.responses.run import Finish, events
from pdserve.server.serving import Started, check_model, start, wait_for_end
from pdserve.server.tools import tool_functions

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


def _input_items(ctx: ServerContext, req: ResponsesRequest) -> list[ListedItem]:
    """The conversation, as listed: the earlier turns' items (those of `previous_response_id`, its
    output last), then this request's input."""
    own = listed(req.items)
    previous = req.previous_response_id
    if previous is None:
        return own
    stored = ctx.responses.get(previous)
    if stored is None:
        why = "is not stored on this server (never made here, made with store: false, or forgotten)"
        if ctx.background.get(previous) is not None:
            why = "is still running (a background response: wait until it has ended)"
        raise APIError(
            400,
            f"previous response '{previous}' {why}",
            code="previous_response_not_found",
            param="previous_response_id",
        )
    return [*stored.input_items, *stored.response.output, *own]


def _check_background(ctx: ServerContext, req: ResponsesRequest, prefill_half: bool) -> None:
    if not req.background:
        return
    if ctx.settings.max_stored_responses == 0:
        raise APIError(
            400,
            "this server stores no responses (--max-stored-responses 0): a background response needs the store",
            code="invalid_value",
            param="background",
        )
    if prefill_half:
        raise APIError(
            400,
            "a prefill half (kv_transfer_params.do_remote_decode) is never stored: send it "
            "without background (a proxy does)",
            code="invalid_value",
            param="background",
        )


def _skeleton(req: ResponsesRequest, started: Started, params: SamplingParams) -> ResponseObject:
    """The Response before any output: what the request asked for, as it is echoed."""
    return ResponseObject(
        id=f"resp_{uuid.uuid4().hex}",
        created_at=started.created,
        status="queued" if req.background else "in_progress",
        model=started.model,
        output=[],
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        parallel_tool_calls=req.parallel_tool_calls,
        previous_response_id=req.previous_response_id,
        reasoning=req.reasoning,
        temperature=params.temperature,
        top_p=params.top_p,
        text=req.text or TextConfig(),
        tool_choice=req.effective_tool_choice,
        tools=req.tools or [],
        background=bool(req.background),
        user=req.user,
        metadata=req.metadata or {},
    )


def _background(
    ctx: ServerContext,
    req: ResponsesRequest,
    started: Started,
    asm: OutputAssembler,
    reply: ReplyFilter,
    input_items: list[ListedItem],
) -> Response:
    """Start the response's run (background.py) and answer at once: the Response ("queued"), or with
    `stream` its events, which go on whether or not the client stays (GET ?stream=true picks them up)."""
    run = BackgroundRun(asm, input_items, started.abort, EventLog() if req.stream else None)
    finish = Finish(ctx.llm.tokenizer, None, input_items)  # the run stores it when it ends
    ctx.background.launch(run, events(started.generations[0].outputs(), asm, reply, finish))
    if run.events is not None:
        return StreamingResponse(run.events.follow(), media_type="text/event-stream", headers=sse.HEADERS)
    return Response(asm.response.json_bytes(), media_type="application/json")


async def create_response(request: Request) -> Response:
    """`POST /v1/responses`: the Response whole, its events, or (background) its start."""
    arrival = time.monotonic()
    ctx = get_context(request)
    ctx.admission.check_open()
    req = await _parse(request, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    prefill_half = (req.kv_transfer_params or {}).get("do_remote_decode") is True  # a proxy's: never kept
    _check_background(ctx, req, prefill_half)
    input_items = _input_items(ctx, req)
    try:
        chat = chat_request(req, as_input(input_items))
        inputs = await chat_inputs(ctx, chat)
        started = start(request, ctx, chat, inputs.token_ids, inputs.params, "resp", arrival)
    except APIError as e:
        e.param = _PARAMS.get(e.param or "", e.param)
        raise
    asm = OutputAssembler(_skeleton(req, started, inputs.params))
    reasoning = ctx.settings.reasoning_parser is not None
    parser = ctx.tool_parser if inputs.tools is not None else None
    stream_filter = ReplyFilter(ReasoningStream() if reasoning else None,
                                parser.stream(tool_functions(chat)) if parser else None)
    if req.background:
        return _background(ctx, req, started, asm, stream_filter, input_items)
    keep = req.store is not False and not prefill_half
    finish = Finish(ctx.llm.tokenizer, ctx.responses.put if keep else None, input_items)
    if req.stream:
        frames = (frame(e) async for e in events(started.generations[0].outputs(), asm, stream_filter, finish))
        return sse.GenerationStream(frames, started.abort, {})
    (result,) = await wait_for_end(request, started)
    thought, parsed = parse_reply(result.text, reasoning, parser, tool_functions(chat))
    asm.reasoning(thought or "")
    asm.content(parsed.content or "")
    for call in parsed.calls:
        asm.call(call.function)
    finish(asm, result.final)
    return Response(asm.response.json_bytes(), media_type="application/json")
