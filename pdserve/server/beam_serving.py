"""vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions: what is refused, the
search's parameters, its admission, and its choices as the endpoints read them.

`n` is the beam width; the choices are the best `n` beams, best first (vLLM's order: by
`cum_logprob / len ** length_penalty`). As in vLLM, `temperature` (the request's, else the model's
default, else 1) and `seed` shape only the one token each step samples, which joins the candidates
when it is not among the 2n likeliest; `top_p`, `top_k` and `min_p` are ignored. Fields a search
cannot honour — its candidates are the model's own likeliest tokens — are a 400 naming the field:
an output constraint, stop strings and ids, `min_tokens`, penalties, `logit_bias`, `bad_words`,
`n` above 10, `max_tokens: 0` and remote KV. `allowed_token_ids` restricts every beam's
candidates to the likeliest allowed tokens (engine/beam_search.py). Streamed, each
choice comes whole in one chunk once the search has ended (as vLLM's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from pdserve.engine.beam_search import MAX_BEAM_WIDTH, BeamSearchParams
from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from pdserve.server.beam_search import BeamInput, BeamSearchRun
from pdserve.server.context import ServerContext
from pdserve.server.errors import APIError
from pdserve.server.generation import Collected
from pdserve.server.inputs import kv_transfer_params, validate
from pdserve.server.protocol import CompletionRequest, SamplingFields
from pdserve.server.request_id import request_id_of
from pdserve.server.request_log import log_request
from pdserve.server.serving import check_priority, lora_of


def _refuse(field: str, why: str) -> APIError:
    return APIError(400, f"{why}: send use_beam_search without {field}", code="invalid_value", param=field)


def _constraint_field(req: SamplingFields) -> str | None:
    """The request field that set an output constraint (None: chat's tool_choice did, or none)."""
    if req.response_format is not None and req.response_format.type != "text":
        return "response_format"
    given = {
        "structured_outputs": req.structured_outputs,
        "guided_json": req.guided_json,
        "guided_regex": req.guided_regex,
        "guided_choice": req.guided_choice,
        "guided_grammar": req.guided_grammar,
    }
    return next((f for f, v in given.items() if v is not None), None)


def check_beam_search(req: SamplingFields, params: SamplingParams) -> None:
    """A 400 naming the field for what a beam search cannot honour (`params`: the request's
    SamplingParams, which hold chat's tool_choice constraint too)."""
    if req.n > MAX_BEAM_WIDTH:
        raise APIError(
            400,
            f"n is the beam width, at most {MAX_BEAM_WIDTH} (each step asks for 2n logprobs, at most "
            f"{MAX_LOGPROBS}), got {req.n}",
            code="invalid_value",
            param="n",
        )
    if params.structured_outputs is not None:
        raise _refuse(
            _constraint_field(req) or "tool_choice",
            "beam search ranks the model's own likeliest tokens; it cannot constrain the output",
        )
    if isinstance(req, CompletionRequest) and req.max_tokens == 0:
        raise _refuse("max_tokens", "max_tokens 0 scores the prompt, which a beam search does not")
    ignored = {
        "stop": bool(req.stop),
        "stop_token_ids": bool(req.stop_token_ids),
        "min_tokens": req.min_tokens > 0,
        "presence_penalty": req.presence_penalty not in (None, 0.0),
        "frequency_penalty": req.frequency_penalty not in (None, 0.0),
        "repetition_penalty": req.repetition_penalty not in (None, 1.0),
        "logit_bias": bool(req.logit_bias),
        "bad_words": bool(req.bad_words),
    }
    field = next((f for f, given in ignored.items() if given), None)
    if field is not None:
        raise _refuse(field, f"beam search ranks beams by the model's own logprobs, which {field} does not change")


def beam_params(ctx: ServerContext, req: SamplingFields, max_tokens: int | None, prompt_len: int) -> BeamSearchParams:
    """vLLM's `to_beam_search_params`: `n` beams; `max_tokens` the request's, else the model's default,
    else what the context leaves after the prompt; `temperature` the request's, else the model's, else 1."""
    defaults = ctx.llm.sampling_defaults
    if max_tokens is None:
        max_tokens = defaults.max_tokens or max(ctx.llm.max_model_len - prompt_len, 1)
    temperature = req.temperature if req.temperature is not None else defaults.temperature
    try:
        return BeamSearchParams(
            beam_width=req.n,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            temperature=1.0 if temperature is None else temperature,
            length_penalty=req.length_penalty,
            include_stop_str_in_output=req.include_stop_str_in_output,
            allowed_token_ids=req.allowed_token_ids,
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


@dataclass(frozen=True)
class BeamChoices:
    """A request's searches (one per prompt of a completions batch) as its choices: prompt k's best
    beams at indices k*n .. k*n+n-1 (serving.Choices)."""

    runs: tuple[BeamSearchRun, ...]
    beam_width: int
    response_id: str
    model: str
    created: int

    @property
    def num_choices(self) -> int:
        return len(self.runs) * self.beam_width

    def abort(self) -> None:
        for run in self.runs:
            run.abort()

    async def results(self) -> list[Collected]:
        per_prompt = await asyncio.gather(*(run.results() for run in self.runs))
        return [choice for choices in per_prompt for choice in choices]

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """Each choice whole, as its one final output, once its prompt's search has ended."""
        for k, run in enumerate(self.runs):
            for i, choice in enumerate(await run.results()):
                yield k * self.beam_width + i, choice.final


def start_beam_search(
    request: Request,
    ctx: ServerContext,
    req: SamplingFields,
    prompts: list[list[int]],
    max_tokens: int | None,
    id_prefix: str,
    arrival: float,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> BeamChoices:
    """Validate and admit one search per prompt (request ids as `start`'s: the request's, `<id>-p<k>`
    for prompt k > 0 of a batch), each running from now on. `logprobs`: alternatives shown per token."""
    kvp = kv_transfer_params(ctx.settings.role, req.kv_transfer_params)
    if kvp is not None and (kvp.do_remote_decode or kvp.do_remote_prefill):
        raise _refuse("kv_transfer_params", "a beam search runs whole on one instance (a proxy sends it so)")
    check_priority(ctx, req.priority)
    base = request_id_of(request)
    lora = lora_of(ctx, req.model)
    inputs = []
    for k, ids in enumerate(prompts):
        params = beam_params(ctx, req, max_tokens, len(ids))
        # context, cache, vocabulary (the prompt's and allowed_token_ids')
        validate(ctx.llm, ids, SamplingParams(max_tokens=params.max_tokens, allowed_token_ids=params.allowed_token_ids))
        inputs.append(
            BeamInput(
                base + (f"-p{k}" if k else ""),
                ids,
                params,
                arrival,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                seed=req.seed,
                lora=lora,
                priority=req.priority,
                cache_salt=req.cache_salt,
            )
        )
    runs: list[BeamSearchRun] = []
    try:
        for inp in inputs:
            runs.append(_admit(ctx, inp))
    except APIError:  # 409 / 429 / 503 for a later prompt: the earlier ones go too
        for run in runs:
            run.abort()
        raise
    return BeamChoices(tuple(runs), req.n, f"{id_prefix}-{base}", ctx.settings.model_name, int(time.time()))


def _admit(ctx: ServerContext, inp: BeamInput) -> BeamSearchRun:
    """Admit one search (its id held until the engine has finished all its requests) and start it."""
    ctx.admission.admit(inp.request_id)
    if ctx.settings.enable_log_requests:
        log_request(inp.request_id, inp.token_ids, inp.params, inp.lora, ctx.settings.max_log_len)

    def done(request_id: str) -> None:
        ctx.admission.release(request_id)
        ctx.beam_searches.pop(request_id, None)

    run = BeamSearchRun(ctx.engine, inp, ctx.llm.tokenizer, ctx.llm.loaded.eos_token_ids, ctx.metrics, done)
    ctx.beam_searches[inp.request_id] = run
    return run
