"""`POST /v1/completions`: a prompt (or a batch of them) in, text out (whole, or streamed as SSE).

A batch of P prompts with `n` choices each answers P * n choices, prompt k's at indices k*n .. k*n+n-1;
usage counts every prompt once. With `echo` the prompt comes first (its text, and with `logprobs`
its tokens' logprobs: the first token has none); `max_tokens: 0` then scores the prompt alone (the
engine still samples one token, which is not shown or counted). vLLM's `return_token_ids` puts the
generated `token_ids` (streamed: each chunk's) and the `prompt_token_ids` (streamed: on a choice's
first chunk) on each choice, and `prompt_logprobs: k` vLLM's `prompt_logprobs` (not streamed).
With vLLM's `truncate_prompt_tokens` each prompt keeps its last k tokens: usage, the returned
prompt ids, echo and its logprobs are those of what the model saw. With vLLM's `use_beam_search` each
prompt's choices are its best `n` beams (server/beam_serving.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from pdserve.engine.logprobs import TokenLogprob
from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.tokenizer import Tokenizer
from pdserve.server import sse
from pdserve.server.beam_serving import check_beam_search, start_beam_search
from pdserve.server.body import parse_body
from pdserve.server.context import get_context
from pdserve.server.errors import APIError
from pdserve.server.inputs import completion_prompts, sampling_params, truncated, validate_constraint
from pdserve.server.logprobs import completion_logprobs, echo_logprobs, prompt_logprobs, top_k
from pdserve.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    KVParamsJSON,
    Usage,
)
from pdserve.server.serving import (
    Choices,
    Started,
    check_model,
    finish_reason,
    kv_params,
    start,
    total_usage,
    usage_of,
    wait_for_end,
)


@dataclass(frozen=True)
class _Shape:
    """How the engine's outputs become this request's choices."""

    req: CompletionRequest
    tok: Tokenizer
    prompt_ids: list[int]
    prompt_text: str

    @property
    def shows_output(self) -> bool:
        return self.req.max_tokens != 0

    def usage(self, out: StepOutput) -> Usage:
        return usage_of(out) if self.shows_output else Usage.of(out.num_prompt_tokens, 0, out.num_cached_tokens)


    def prefix(self, prompt_lps: list[TokenLogprob] | None) -> tuple[str, CompletionLogprobs | None]:
        """The echoed prompt: its text and (with logprobs) its tokens' logprobs."""
        if not self.req.echo:
            return "", None
        k = self.req.logprobs
        as_ids = bool(self.req.return_tokens_as_token_ids)
        lps = echo_logprobs(self.tok, self.prompt_ids, top_k(prompt_lps or [], k), as_ids) if k is not None else None
        return self.prompt_text, lps

    def choice(
        self, index: int, text: str, token_ids: list[int], lps: list[TokenLogprob], offset: int, out: StepOutput,
        first: bool, prompt_lps: list[TokenLogprob] | None,
    ) -> CompletionChoice:
        """`text` / `token_ids` / `lps`: generated, starting at `offset` of the generated text;
        `first`: the choice (or chunk) that carries the prompt: echoed, its token ids and logprobs
        (`prompt_lps`) when asked."""
        req = self.req
        if not self.shows_output:
            text, token_ids, lps = "", [], []
        prefix, prefix_lps = self.prefix(prompt_lps) if first else ("", None)
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(self.tok, lps, len(prefix) + offset, bool(req.return_tokens_as_token_ids))
            logprobs = prefix_lps + logprobs if prefix_lps is not None else logprobs
        prompt_k = req.prompt_logprobs if first and prompt_lps is not None else None
        return CompletionChoice(
            index=index, text=prefix + text, logprobs=logprobs, finish_reason=finish_reason(out),
            prompt_token_ids=self.prompt_ids if first and req.return_token_ids else None,
            token_ids=list(token_ids) if req.return_token_ids else None,
            prompt_logprobs=None if prompt_k is None else prompt_logprobs(self.tok, prompt_lps or [], prompt_k),
        )


async def create_completion(request: Request) -> Response:
    arrival = time.monotonic()
    ctx = get_context(request)
    ctx.admission.check_open()
    req = await parse_body(request, CompletionRequest, ctx.settings.max_body_bytes)
    check_model(ctx, req.model)
    whole = completion_prompts(ctx.llm, req)
    if len(whole) > 1 and req.kv_transfer_params is not None:
        raise APIError(400, "a KV transfer is for one prompt: send a batch without kv_transfer_params",
                       code="invalid_value", param="prompt")
    # The prompt's logprobs serve `prompt_logprobs` and echo with logprobs: the larger k of the two.
    prompt_ks = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
    params = sampling_params(req, 1 if req.max_tokens == 0 else req.max_tokens, req.logprobs,
                             max(prompt_ks, default=None), ctx.llm.sampling_defaults)
    prompts = [truncated(ctx.llm, ids, params) for ids in whole]
    if req.use_beam_search:
        check_beam_search(req, params)
    await validate_constraint(ctx.llm, params, req)
    tok = ctx.llm.tokenizer
    started: Choices = (
        start_beam_search(request, ctx, req, prompts, req.max_tokens, "cmpl", arrival, req.logprobs,
                          max(prompt_ks, default=None))
        if req.use_beam_search else _start(request, req, prompts, params, arrival)
    )
    shapes = [_Shape(req, tok, ids, _echoed(req, tok, prompt, ids, len(ids) < len(full)))
              for prompt, full, ids in zip(req.prompts, whole, prompts, strict=True) for _ in range(req.n)]
    if req.stream:
        return sse.GenerationStream(_stream(shapes, started), started.abort, {})
    results = await wait_for_end(request, started)
    body = CompletionResponse(
        id=started.response_id,
        created=started.created,
        model=started.model,
        choices=[shapes[i].choice(i, r.text, r.token_ids, r.logprobs, 0, r.final, True, r.prompt_logprobs)
                 for i, r in enumerate(results)],
        usage=_total_usage(shapes, [r.final for r in results]),
        kv_transfer_params=kv_params(results[0].final),
    )
    return Response(body.model_dump_json(), media_type="application/json")


def _start(request: Request, req: CompletionRequest, prompts: list[list[int]], params: SamplingParams,
           arrival: float) -> Started:
    """Every prompt's `n` engine requests, or none (an APIError for one prompt aborts the others)."""
    ctx = get_context(request)
    parts: list[Started] = []
    try:
        for k, token_ids in enumerate(prompts):  # start() validates the ids too
            parts.append(start(request, ctx, req, token_ids, params, "cmpl", arrival, batch_index=k))
    except APIError:  # a later prompt refused: the earlier ones go too
        for part in parts:
            part.abort()
        raise
    return Started(tuple(g for p in parts for g in p.generations), parts[0].response_id, parts[0].model,
                   parts[0].created)


def _echoed(req: CompletionRequest, tok: Tokenizer, prompt: str | list[int], ids: list[int], cut: bool) -> str:
    """The prompt as echoed: its text, or its ids decoded (token ids given, or a text prompt that
    `truncate_prompt_tokens` cut: what the model saw)."""
    if not req.echo:
        return ""
    return prompt if isinstance(prompt, str) and not cut else tok.decode(ids, False)


def _total_usage(shapes: list[_Shape], finals: list[StepOutput]) -> Usage:
    """Every prompt once, every choice's completion tokens (`finals` in choice order)."""
    n = shapes[0].req.n
    per_prompt = [total_usage(finals[k:k + n], shapes[0].shows_output) for k in range(0, len(finals), n)]
    return Usage.of(sum(u.prompt_tokens for u in per_prompt), sum(u.completion_tokens for u in per_prompt),
                    sum(u.prompt_tokens_details.cached_tokens for u in per_prompt))


async def _stream(shapes: list[_Shape], s: Choices) -> AsyncIterator[bytes]:
    req = shapes[0].req

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

    n = s.num_choices
    offsets = [0] * n  # of each choice's next text in its whole generated text
    first = [True] * n
    finals: dict[int, StepOutput] = {}
    # Most chunks differ in their text alone: neither the choice's first nor its last, no logprobs,
    # token ids or running usage. Those come from a template made by the general path below.
    plain = (req.logprobs is None and not req.return_token_ids and not (req.include_usage and req.continuous_usage)
             and shapes[0].shows_output)
    slots: dict[int, sse.TextSlot] = {}
    async for i, out in s.outputs():
        if plain and not first[i] and not out.finished:
            if out.new_token_ids or out.new_text:
                slot = slots.get(i)
                if slot is None:
                    slot = slots[i] = sse.TextSlot(
                        lambda text, i=i, out=out: chunk([shapes[i].choice(i, text, [], [], 0, out, False, None)]))
                offsets[i] += len(out.new_text)
                yield slot(out.new_text)
            continue
        if out.finish_reason == "error":
            yield sse.error_event(out.error or "the engine failed this request")
            break
        shape = shapes[i]
        if out.new_token_ids or out.new_text or out.finished:
            running = shape.usage(out) if req.include_usage and req.continuous_usage else None
            kv = kv_params(out) if out.finished else None
            choice = shape.choice(i, out.new_text, out.new_token_ids, out.logprobs or [], offsets[i], out, first[i],
                                  out.prompt_logprobs)
            offsets[i] += len(out.new_text)
            if first[i] or shape.shows_output or out.finished:
                yield chunk([choice], running, kv)
            first[i] = False
        if out.finished:
            finals[i] = out
            if req.include_usage and len(finals) == n:
                yield chunk([], _total_usage(shapes, [finals[j] for j in range(n)]))
    yield sse.DONE
