"""`POST /tokenize` and `POST /detokenize` (vLLM's routes): the model's tokenizer over HTTP, with
the same rendering as the generation endpoints, so `count` is the `prompt_tokens` a completion
or chat request with that input would report."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from pdserve.server.body import parse_body
from pdserve.server.context import get_context
from pdserve.server.errors import APIError
from pdserve.server.inputs import chat_prompt, chat_template
from pdserve.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from pdserve.server.serving import check_model


async def tokenize(request: Request) -> Response:
    ctx = get_context(request)
    req = await parse_body(request, TokenizeRequest, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    tok = ctx.llm.tokenizer
    if req.messages is not None:
        template = chat_template(ctx.settings, req.chat_template, req.chat_template_kwargs)
        ids = chat_prompt(ctx.llm, req.messages, req.add_generation_prompt, None, req.chat_template_kwargs,
                          bool(req.add_special_tokens), template, req.continue_final_message)
    else:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tok.encode(req.prompt or "", add_special_tokens=special)
    body = TokenizeResponse(count=len(ids), max_model_len=ctx.llm.max_model_len, tokens=ids)
    return Response(body.model_dump_json(), media_type="application/json")


async def detokenize(request: Request) -> Response:
    ctx = get_context(request)
    req = await parse_body(request, DetokenizeRequest, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    vocab = ctx.llm.model_config.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", code="invalid_value",
                       param="tokens")
    text = ctx.llm.tokenizer.decode(req.tokens, skip_special_tokens=False)
    return Response(DetokenizeResponse(prompt=text).model_dump_json(), media_type="application/json")
