"""`POST /v1/embeddings`: each input is prefilled (no decode step) and pooled by the engine
(`--pooling-type`: the last token's final hidden state, or the mean over the input), L2-normalized.

A batch of inputs becomes one engine request per input (ids `<id>`, `<id>-p1`, ...), admitted
together: one refused, the others go too. `encoding_format: "base64"` is the vector's little-endian
float32 bytes, as OpenAI's client decodes it (and asks for by default). vLLM's `truncate_prompt_tokens`
keeps each input's last k tokens (-1: as many as the context holds); usage counts what was pooled.
"""

from __future__ import annotations

import base64
import struct
import time

from starlette.requests import Request
from starlette.responses import Response

from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.body import parse_body
from pdserve.server.context import ServerContext, get_context
from pdserve.server.embedding_protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from pdserve.server.errors import APIError
from pdserve.server.generation import Generation, GenerationInput
from pdserve.server.inputs import truncated
from pdserve.server.request_id import request_id_of
from pdserve.server.serving import Started, check_ids_free, check_model, lora_of, wait_for_end

_UNUSED = SamplingParams(max_tokens=1, temperature=0.0)  # an embedding request samples nothing


def _token_ids(ctx: ServerContext, req: EmbeddingRequest, pooling: PoolingParams) -> list[list[int]]:
    """Each input's ids (its last `truncate_prompt_tokens`, when asked), checked by the engine (empty,
    vocabulary, context, cache, dimensions): 400s."""
    tok = ctx.llm.tokenizer
    out = []
    for p in req.inputs:
        ids = tok.encode(p, add_special_tokens=req.add_special_tokens) if isinstance(p, str) else list(p)
        ids = truncated(ctx.llm, ids, pooling)
        try:
            ctx.llm.validate_pooling(ids, pooling)
        except ValueError as e:
            msg = str(e)
            code = "context_length_exceeded" if "context length" in msg else "invalid_value"
            raise APIError(400, msg, code=code, param="dimensions" if msg.startswith("dimensions") else "input"
                           ) from None
        out.append(ids)
    return out


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create_embedding(request: Request) -> Response:
    arrival = time.monotonic()
    ctx = get_context(request)
    ctx.admission.check_open()
    req = await parse_body(request, EmbeddingRequest, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    pooling = PoolingParams(normalize=req.normalize, dimensions=req.dimensions,
                            truncate_prompt_tokens=req.truncate_prompt_tokens)
    prompts = _token_ids(ctx, req, pooling)
    lora = lora_of(ctx, req.model)
    request_id = request_id_of(request)
    rids = [request_id + (f"-p{k}" if k else "") for k in range(len(prompts))]
    check_ids_free(ctx, rids)
    gens: list[Generation] = []
    try:
        for rid, ids in zip(rids, prompts, strict=True):
            gens.append(ctx.start(GenerationInput(rid, ids, _UNUSED, None, arrival, lora, pooling=pooling)))
    except APIError:  # 409 / 429 / 503 for a later input: the earlier ones go too
        for gen in gens:
            gen.abort()
        raise
    started = Started(tuple(gens), f"embd-{request_id}", ctx.settings.model_name, int(time.time()))
    results = await wait_for_end(request, started)
    data = []
    for i, r in enumerate(results):
        if r.final.embedding is None:  # aborted (a drain that timed out)
            raise APIError(503, r.final.error or "the request ended before its embedding", code="aborted")
        data.append(EmbeddingData(index=i, embedding=_encode(r.final.embedding, req.encoding_format)))
    tokens = sum(len(ids) for ids in prompts)
    body = EmbeddingResponse(id=started.response_id, created=started.created, model=started.model, data=data,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    return Response(body.model_dump_json(), media_type="application/json")
