"""`POST /v1/chat/completions`: messages through the model's chat template, an assistant reply out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pdserve.engine.outputs import StepOutput
from pdserve.model.tokenizer import Tokenizer
from pdserve.server import sse
from pdserve.server.body import parse_body
from pdserve.server.context import get_context
from pdserve.server.inputs import chat_prompt, sampling_params
from pdserve.server.logprobs import chat_logprobs
from pdserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    KVParamsJSON,
    Usage,
)
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


async def create_chat_completion(request: Request) -> Response:
    arrival = time.monotonic()
    ctx = get_context(request)
    ctx.admission.check_open()
    req = await parse_body(request, ChatCompletionRequest, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    token_ids = chat_prompt(ctx.llm, req.messages, req.add_generation_prompt)
    params = sampling_params(req, req.output_limit, (req.top_logprobs or 0) if req.logprobs else None)
    started = start(request, ctx, req, token_ids, params, "chatcmpl", arrival)
    if req.stream:
        return sse.GenerationStream(_stream(req, started, ctx.llm.tokenizer), started.abort, {})
    results = await wait_for_end(request, started)
    choices = [
        ChatChoice(
            index=i, message=AssistantMessage(content=r.text), finish_reason=finish_reason(r.final),
            logprobs=chat_logprobs(ctx.llm.tokenizer, r.logprobs) if req.logprobs else None,
        )
        for i, r in enumerate(results)
    ]
    body = ChatCompletionResponse(
        id=started.response_id,
        created=started.created,
        model=started.model,
        choices=choices,
        usage=total_usage([r.final for r in results]),
        kv_transfer_params=kv_params(results[0].final),
    )
    return Response(body.model_dump_json(), media_type="application/json")


async def _stream(req: ChatCompletionRequest, s: Started, tok: Tokenizer) -> AsyncIterator[bytes]:
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
            delta = DeltaMessage(content=out.new_text)
            lps = chat_logprobs(tok, out.logprobs or ()) if req.logprobs else None
            choice = ChatChunkChoice(index=i, delta=delta, logprobs=lps, finish_reason=finish_reason(out))
            yield chunk([choice], running, kv)
        if out.finished:
            finals.append(out)
            if req.include_usage and len(finals) == n:
                yield chunk([], total_usage(finals))
    yield sse.DONE
