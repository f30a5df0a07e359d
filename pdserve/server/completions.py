"""`POST /v1/completions`: one prompt in, text out (whole, or streamed as SSE)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pdserve.model.tokenizer import Tokenizer
from pdserve.server import sse
from pdserve.server.body import parse_body
from pdserve.server.context import get_context
from pdserve.server.inputs import completion_prompt, sampling_params
from pdserve.server.logprobs import completion_logprobs
from pdserve.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    KVParamsJSON,
    Usage,
)
from pdserve.server.serving import (
    Started,
    check_model,
    finish_reason,
    kv_params,
    start,
    usage_of,
    wait_for_end,
)


async def create_completion(request: Request) -> Response:
    arrival = time.monotonic()
    ctx = get_context(request)
    ctx.admission.check_open()
    req = await parse_body(request, CompletionRequest, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    token_ids = completion_prompt(ctx.llm, req)
    params = sampling_params(req, req.max_tokens, req.logprobs)
    started = start(request, ctx, req, token_ids, params, "cmpl", arrival)
    if req.stream:
        return sse.GenerationStream(_stream(req, started, ctx.llm.tokenizer), started.generation.abort, {})
    result = await wait_for_end(request, started.generation)
    lps = completion_logprobs(ctx.llm.tokenizer, result.logprobs, 0) if req.logprobs is not None else None
    body = CompletionResponse(
        id=started.response_id,
        created=started.created,
        model=started.model,
        choices=[CompletionChoice(text=result.text, logprobs=lps, finish_reason=finish_reason(result.final))],
        usage=usage_of(result.final),
        kv_transfer_params=kv_params(result.final),
    )
    return Response(body.model_dump_json(), media_type="application/json")


async def _stream(req: CompletionRequest, s: Started, tok: Tokenizer) -> AsyncIterator[bytes]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None, kv: KVParamsJSON | None = None) -> bytes:
        return sse.event(
            CompletionChunk(
                id=s.response_id,
                created=s.created,
                model=s.model,
                choices=choices,
                usage=usage,
                kv_transfer_params=kv,
            )
        )

    offset = 0  # of this chunk's text in the whole completion
    async for out in s.generation.outputs():
        if out.finish_reason == "error":
            yield sse.error_event(out.error or "the engine failed this request")
            break
        if out.new_token_ids or out.new_text or out.finished:
            running = usage_of(out) if req.include_usage and req.continuous_usage else None
            kv = kv_params(out) if out.finished else None
            lps = completion_logprobs(tok, out.logprobs or (), offset) if req.logprobs is not None else None
            offset += len(out.new_text)
            choice = CompletionChoice(text=out.new_text, logprobs=lps, finish_reason=finish_reason(out))
            yield chunk([choice], running, kv)
        if out.finished and req.include_usage:
            yield chunk([], usage_of(out))
    yield sse.DONE
