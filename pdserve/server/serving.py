"""What completions and chat completions share: admission of a parsed request, the
non-streaming wait (watching for a disconnect), and the final output's conversions."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import msgspec
from starlette.requests import Request

from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.context import ServerContext
from pdserve.server.errors import APIError
from pdserve.server.generation import Collected, Generation, GenerationInput, watch_disconnect
from pdserve.server.inputs import kv_transfer_params, validate
from pdserve.server.protocol import FinishReason, KVParamsJSON, SamplingFields, Usage
from pdserve.server.request_id import request_id_of
from pdserve.server.vllm_metrics import ChoiceGroup

log = logging.getLogger(__name__)


class Choices(Protocol):
    """A started request as the endpoints read it: `Started` (an engine request per choice) or a
    beam search's (server/beam_serving.py)."""

    @property
    def response_id(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def created(self) -> int: ...

    @property
    def num_choices(self) -> int: ...

    def abort(self) -> None: ...

    def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, output) as they come; each choice's last one has `finished` set."""
        ...

    async def results(self) -> list[Collected]:
        """Every choice's whole result, in choice order."""
        ...


@dataclass(frozen=True)
class Started:
    """A request the engine has accepted (one engine request per choice: `n`), with what its
    responses carry."""

    generations: tuple[Generation, ...]
    response_id: str
    model: str
    created: int

    @property
    def num_choices(self) -> int:
        return len(self.generations)

    def abort(self) -> None:
        for gen in self.generations:
            gen.abort()

    async def results(self) -> list[Collected]:
        return list(await asyncio.gather(*(g.collect() for g in self.generations)))

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, output) as they come; each choice's last one has `finished` set."""
        if len(self.generations) == 1:
            async for out in self.generations[0].outputs():
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()

        async def pump(i: int, gen: Generation) -> None:
            async for out in gen.outputs():
                queue.put_nowait((i, out))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self.generations)]
        try:
            left = len(tasks)
            while left:
                i, out = await queue.get()
                left -= 1 if out.finished else 0
                yield i, out
        finally:
            for t in tasks:
                t.cancel()


def check_model(ctx: ServerContext, model: str | None) -> None:
    """404 unless `model` is absent, a served name of the base model, or a loaded LoRA adapter's."""
    if model is not None and model not in ctx.settings.served_model_names and model not in ctx.loras:
        raise APIError(404, f"the model '{model}' does not exist", code="model_not_found", param="model")


def lora_of(ctx: ServerContext, model: str | None) -> LoRARequest | None:
    """The loaded LoRA adapter the request's `model` names (None: the base model)."""
    return ctx.loras.get(model) if model is not None else None


def check_priority(ctx: ServerContext, priority: int) -> None:
    """A 400 naming `priority` for one the scheduling policy does not take."""
    try:
        ctx.llm.validate_priority(priority)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value", param="priority") from None


def check_ids_free(ctx: ServerContext, ids: list[str]) -> None:
    """A 400 for an id the KV connector still keeps state under (a both instance's prefill half holds
    its blocks after it has answered, until the decode has them), before anything is allocated. An
    id in flight on this server is admission's 409."""
    conn = ctx.llm.connector
    if conn is None:
        return
    for rid in ids:
        if rid in ctx.admission.in_flight:
            continue
        # Read off the engine thread: the connector takes an id only from a request admitted after this
        # check, so a stale answer can only refuse an id that is being freed.
        try:
            conn.check_request_id(rid)
        except ValueError as e:
            raise APIError(400, str(e), code="request_id_in_use", param="X-Request-Id") from None


def start(
    request: Request,
    ctx: ServerContext,
    req: SamplingFields,
    token_ids: list[int],
    params: SamplingParams,
    id_prefix: str,
    arrival: float,
    batch_index: int = 0,
) -> Started:
    """Admit one prompt's `n` engine requests (choice 0 keeps the request id; prompt k > 0 of a
    completions batch gets `<id>-p<k>`)."""
    validate(ctx.llm, token_ids, params)
    kvp = kv_transfer_params(ctx.settings.role, req.kv_transfer_params)
    if kvp is not None and ctx.llm.connector is not None:
        try:  # here, not in the engine's thread: a 400 before anything starts
            ctx.llm.connector.validate(kvp, len(token_ids))
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value", param="kv_transfer_params") from None
    if req.n > 1 and kvp is not None and kvp.do_remote_decode:
        raise APIError(400, "a prefill half computes one choice: send it with n = 1 (a proxy does)",
                       code="invalid_value", param="n")
    if params.prompt_logprobs is not None and kvp is not None and kvp.do_remote_prefill:
        field = "prompt_logprobs" if req.prompt_logprobs is not None else "echo"
        raise APIError(400, f"{field} needs the prompt computed on this instance: send it without "
                       "kv_transfer_params (a proxy routes such requests so)", code="invalid_value", param=field)
    check_priority(ctx, req.priority)
    request_id = request_id_of(request) + (f"-p{batch_index}" if batch_index else "")
    # Choice 0 keeps the request's id: a prefill instance knows the KV it holds for us by that id.
    ids = [request_id] + [f"{request_id}-{i}" for i in range(1, req.n)]
    check_ids_free(ctx, ids)
    remote = kvp is not None and kvp.do_remote_prefill
    lora = lora_of(ctx, req.model)
    # n > 1: choices after the first wait until the first has its first token, when its prompt's KV
    # (computed here or transferred) is in the prefix cache: they then compute only its last block.
    # With remote KV they must: the transfer feeds the first choice alone.
    staged = remote or ctx.llm.config.cache.enable_prefix_caching
    gens: list[Generation] = []
    choices = ChoiceGroup(req.n) if req.n > 1 else None
    try:
        for i, rid in enumerate(ids):
            # Choice i draws from its own seed (seed + i): seeded choices differ from each other.
            p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=(params.seed + i) % 2**64)
            if i == 0:
                gens.append(ctx.start(GenerationInput(rid, token_ids, p, kvp, arrival, lora, req.priority,
                                                      cache_salt=req.cache_salt, choices=choices)))
            else:
                after = gens[0].first_output if staged else None
                inp = GenerationInput(rid, token_ids, p, None if remote else kvp, arrival, lora, req.priority,
                                      cache_salt=req.cache_salt, choices=choices)
                gens.append(ctx.start(inp, after))
    except APIError:  # 409 / 429 / 503 for a later choice: the earlier ones go too
        for gen in gens:
            gen.abort()
        raise
    return Started(tuple(gens), f"{id_prefix}-{request_id}", ctx.settings.model_name, int(time.time()))


async def wait_for_end(request: Request, started: Choices) -> list[Collected]:
    """Collect a non-streaming request, one result per choice; a client that disconnects meanwhile
    aborts it."""
    watcher = asyncio.create_task(watch_disconnect(request, started.abort))
    try:
        results = await started.results()
    finally:
        watcher.cancel()
        started.abort()  # no-op when finished; frees the blocks if this handler was cancelled
    for result in results:
        if result.final.finish_reason == "error":
            raise APIError(500, result.final.error or "the engine failed this request", code="engine_error")
    return list(results)


def total_usage(finals: list[StepOutput], shows_output: bool = True) -> Usage:
    """One prompt, every choice's completion tokens."""
    return Usage.of(
        finals[0].num_prompt_tokens,
        sum(f.num_output_tokens for f in finals) if shows_output else 0,
        finals[0].num_cached_tokens,
    )


def finish_reason(out: StepOutput) -> FinishReason | None:
    if not out.finished:
        return None
    reason = out.finish_reason
    return reason if reason in ("stop", "length", "abort", "error") else "stop"  # type: ignore[return-value]


def usage_of(out: StepOutput) -> Usage:
    return Usage.of(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens)


def kv_params(out: StepOutput) -> KVParamsJSON | None:
    """The engine's kv_transfer_params (a dict, or a typed struct from the connector) as JSON."""
    value = out.kv_transfer_params
    if value is None or isinstance(value, dict):
        return value
    try:
        return msgspec.to_builtins(value)
    except TypeError:
        log.warning("cannot serialise kv_transfer_params of type %s", type(value).__name__)
        return None
