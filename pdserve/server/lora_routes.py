"""vLLM's runtime LoRA routes: `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`.

The adapter is read from disk off the event loop, installed on the engine thread (between two
steps), and the server's name → adapter table is refreshed from what the engine then holds (a load
past --max-loras may have evicted an idle adapter).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from pdserve.engine.lora import LoRAManager
from pdserve.engine.lora_request import LoRARequest
from pdserve.server.body import parse_body
from pdserve.server.context import ServerContext, get_context
from pdserve.server.errors import APIError
from pdserve.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest


def _manager(ctx: ServerContext) -> LoRAManager:
    try:
        return ctx.llm.lora_manager()
    except ValueError as e:  # LoRA is off
        raise APIError(400, str(e), code="invalid_value") from None


def _refresh(ctx: ServerContext, loaded: list[LoRARequest]) -> None:
    ctx.loras = {lo.lora_name: lo for lo in loaded}


async def load_lora_adapter(request: Request) -> Response:
    ctx = get_context(request)
    req = await parse_body(request, LoadLoRAAdapterRequest, ctx.settings.max_body_bytes)
    manager = _manager(ctx)
    if req.lora_name in ctx.loras or req.lora_name in ctx.settings.served_model_names:
        raise APIError(400, f"the name '{req.lora_name}' is taken: unload that adapter first",
                       code="invalid_value", param="lora_name")
    try:
        weights = await asyncio.to_thread(manager.read, req.lora_name, req.lora_path)
    except (OSError, ValueError) as e:
        raise APIError(400, f"cannot load LoRA adapter '{req.lora_name}': {e}", code="invalid_value",
                       param="lora_path") from None

    def install() -> list[LoRARequest]:
        ctx.llm.add_lora(LoRARequest(req.lora_name, ctx.llm.next_lora_id(), req.lora_path), weights)
        return ctx.llm.list_loras()

    try:
        _refresh(ctx, await ctx.engine.call(install))
    except ValueError as e:  # --max-loras adapters loaded and all in use
        raise APIError(409, str(e), code="conflict") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    ctx = get_context(request)
    req = await parse_body(request, UnloadLoRAAdapterRequest, ctx.settings.max_body_bytes)
    _manager(ctx)
    if req.lora_name not in ctx.loras:
        raise APIError(404, f"no LoRA adapter named '{req.lora_name}' is loaded", code="not_found",
                       param="lora_name")

    def remove() -> list[LoRARequest]:
        ctx.llm.remove_lora(req.lora_name)
        return ctx.llm.list_loras()

    try:
        _refresh(ctx, await ctx.engine.call(remove))
    except ValueError as e:  # in use by unfinished requests
        raise APIError(409, str(e), code="conflict") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
