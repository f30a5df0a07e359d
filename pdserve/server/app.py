"""The FastAPI app: OpenAI routes under /v1 and vLLM's /tokenize, /detokenize (API key when set), /health,
/metrics and vLLM's /version and /ping (SageMaker's health check: /health's answer, GET or POST).

`build_app(ctx)` takes a running AsyncEngine through the context; it owns no globals, so tests
can build several apps in one process.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from pdserve import __version__
from pdserve.model.kv_quant import dtype_name
from pdserve.server.auth import require_api_key
from pdserve.server.chat import create_chat_completion
from pdserve.server.completions import create_completion
from pdserve.server.context import ServerContext, get_context
from pdserve.server.embedding_protocol import EmbeddingRequest
from pdserve.server.embeddings import create_embedding
from pdserve.server.errors import APIError, install_error_handlers
from pdserve.server.frontend_args import cors_middleware_options
from pdserve.server.lora_routes import load_lora_adapter, unload_lora_adapter
from pdserve.server.prometheus import CONTENT_TYPE
from pdserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    openapi_body,
)
from pdserve.server.request_id import RequestIdMiddleware
from pdserve.server.responses.endpoint import create_response
from pdserve.server.responses.input_items import list_input_items
from pdserve.server.responses.manage import cancel_response, delete_response, retrieve_response
from pdserve.server.responses.request import ResponsesRequest
from pdserve.server.tokenize import detokenize, tokenize


async def health(request: Request) -> Response:
    """200 while serving; 503 once a drain has begun (load balancers stop sending)."""
    ctx = get_context(request)
    if not ctx.ready:
        raise APIError(503, "the server is shutting down", code="server_shutting_down")
    return JSONResponse({"status": "ok", "role": ctx.settings.role})


async def version(_: Request) -> Response:
    """vLLM's route: the server's version."""
    return JSONResponse({"version": __version__})


async def metrics(request: Request) -> Response:
    return PlainTextResponse(get_context(request).metrics.render(), media_type=CONTENT_TYPE)


async def list_models(request: Request) -> Response:
    ctx = get_context(request)
    cards = [
        ModelCard(id=name, root=ctx.llm.config.model, max_model_len=ctx.llm.max_model_len)
        for name in ctx.settings.served_model_names
    ] + [
        ModelCard(
            id=name, root=lora.lora_path, parent=ctx.settings.served_model_names[0], max_model_len=ctx.llm.max_model_len
        )
        for name, lora in ctx.loras.items()
    ]
    return Response(ModelList(data=cards).model_dump_json(), media_type="application/json")


async def kv_info(request: Request) -> Response:
    """This instance's KV coordinates (what a proxy with static instances needs for WRITE mode)."""
    ctx = get_context(request)
    conn = ctx.llm.connector
    if conn is None:
        raise APIError(404, "this instance runs --role standalone: it has no KV ports", code="not_found")
    return JSONResponse(
        {
            "engine_id": conn.engine_id,
            "role": conn.role,
            "host": conn.host,
            "handshake_port": conn.handshake_port,
            "notify_port": conn.notify_port,
            "transfer_mode": conn.transfer_mode,
            # How the blocks are stored: peers must match (the handshake refuses another dtype).
            "kv_cache_dtype": ctx.llm.config.cache.cache_dtype,
            "kv_dtype": dtype_name(conn.cache.layout.dtype),
            "kv_block_bytes": conn.cache.layout.block_bytes,
            # Requests served as each half so far (a `--role both` instance serves both).
            "prefill_halves": conn.stats.prefill_halves,
            "decode_halves": conn.stats.decode_halves,
        }
    )


async def reset_prefix_cache(request: Request) -> Response:
    """vLLM's route: forget the prefix cache's free blocks (e.g. between benchmark runs)."""
    ctx = get_context(request)
    forgotten = await ctx.engine.reset_prefix_cache()
    return JSONResponse({"forgotten_blocks": forgotten, "cached_blocks": ctx.llm.block_pool.num_cached})


def _install_openapi(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            comps = spec.setdefault("components", {}).setdefault("schemas", {})
            for path in spec["paths"].values():
                for op in path.values():
                    comps.update(op.pop("x-components", {}))
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="pdserve", version=__version__)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    cors = ctx.settings.frontend.cors
    if cors.allowed_origins:  # vLLM's CORS flags; outermost, so preflights need no API key (as vLLM)
        app.add_middleware(CORSMiddleware, **cors_middleware_options(cors))  # type: ignore[arg-type]
    app.add_api_route("/health", health, methods=["GET"])
    for method in ("GET", "POST"):  # vLLM's (SageMaker's health check): /health's answer
        app.add_api_route("/ping", health, methods=[method])
    app.add_api_route("/version", version, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/kv_info", kv_info, methods=["GET"])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    v1.add_api_route("/models", list_models, methods=["GET"])
    v1.add_api_route(
        "/load_lora_adapter", load_lora_adapter, methods=["POST"], openapi_extra=openapi_body(LoadLoRAAdapterRequest)
    )
    v1.add_api_route(
        "/unload_lora_adapter",
        unload_lora_adapter,
        methods=["POST"],
        openapi_extra=openapi_body(UnloadLoRAAdapterRequest),
    )
    v1.add_api_route("/completions", create_completion, methods=["POST"], openapi_extra=openapi_body(CompletionRequest))
    v1.add_api_route(
        "/chat/completions", create_chat_completion, methods=["POST"], openapi_extra=openapi_body(ChatCompletionRequest)
    )
    v1.add_api_route("/embeddings", create_embedding, methods=["POST"], openapi_extra=openapi_body(EmbeddingRequest))
    v1.add_api_route("/responses", create_response, methods=["POST"], openapi_extra=openapi_body(ResponsesRequest))
    v1.add_api_route("/responses/{response_id}", retrieve_response, methods=["GET"])
    v1.add_api_route("/responses/{response_id}", delete_response, methods=["DELETE"])
    v1.add_api_route("/responses/{response_id}/cancel", cancel_response, methods=["POST"])
    v1.add_api_route("/responses/{response_id}/input_items", list_input_items, methods=["GET"])
    app.include_router(v1)
    tok = APIRouter(dependencies=[Depends(require_api_key)])  # vLLM's paths: no /v1
    tok.add_api_route("/tokenize", tokenize, methods=["POST"], openapi_extra=openapi_body(TokenizeRequest))
    tok.add_api_route("/detokenize", detokenize, methods=["POST"], openapi_extra=openapi_body(DetokenizeRequest))
    tok.add_api_route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"])
    app.include_router(tok)
    _install_openapi(app)
    return app
