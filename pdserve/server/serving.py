"""What completions and chat completions share: admission of a parsed request, the
non-streaming wait (watching for a disconnect), and the final output's conversions."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec
from starlette.requests import Request

from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.context import ServerContext
from pdserve.server.errors import APIError
from pdserve.server.generation import Collected, Generation, GenerationInput, watch_disconnect
from pdserve.server.inputs import kv_transfer_params, validate
from pdserve.server.protocol import FinishReason, KVParamsJSON, SamplingFields, Usage
from pdserve.server.request_id import request_id_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Started:
    """A request the engine has accepted, with what its responses carry."""

    generation: Generation
    response_id: str
    model: str
    created: int


def check_model(ctx: ServerContext, model: str | None) -> None:
    if model is not None and model not in ctx.settings.served_model_names:
        raise APIError(404, f"the model '{model}' does not exist", code="model_not_found", param="model")


def start(
    request: Request,
    ctx: ServerContext,
    req: SamplingFields,
    token_ids: list[int],
    params: SamplingParams,
    id_prefix: str,
    arrival: float,
) -> Started:
    validate(ctx.llm, token_ids, params)
    kvp = kv_transfer_params(ctx.settings.role, req.kv_transfer_params)
    request_id = request_id_of(request)
    gen = ctx.start(GenerationInput(request_id, token_ids, params, kvp, arrival))
    return Started(gen, f"{id_prefix}-{request_id}", ctx.settings.model_name, int(time.time()))


async def wait_for_end(request: Request, gen: Generation) -> Collected:
    """Collect a non-streaming request; a client that disconnects meanwhile aborts it."""
    watcher = asyncio.create_task(watch_disconnect(request, gen.abort))
    try:
        result = await gen.collect()
    finally:
        watcher.cancel()
        gen.abort()  # no-op when finished; frees the blocks if this handler was cancelled
    if result.final.finish_reason == "error":
        raise APIError(500, result.final.error or "the engine failed this request", code="engine_error")
    return result


def finish_reason(out: StepOutput) -> FinishReason | None:
    if not out.finished:
        return None
    reason = out.finish_reason
    return reason if reason in ("stop", "length", "abort", "error") else "stop"  # type: ignore[return-value]


def usage_of(out: StepOutput) -> Usage:
    return Usage.of(out.num_prompt_tokens, out.num_output_tokens)


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
