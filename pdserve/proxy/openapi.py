"""The proxy's OpenAPI schema (GET /openapi.json): the admin routes as FastAPI documents them, plus
the two generation paths, which are raw ASGI endpoints (relay.py) FastAPI does not see.

Their request bodies are the server's own models (pdserve.server.protocol): the proxy forwards a
body untouched (disagg: plus the fields bodies.py sets) and the instance validates it, so what an
instance accepts is what the proxy accepts. Clients and fuzzers read every field from here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from pdserve.server.embedding_protocol import EmbeddingRequest
from pdserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from pdserve.server.responses.request import ResponsesRequest

GENERATION_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/embeddings": EmbeddingRequest,
}
TOKENIZER_BODIES: dict[str, type[BaseModel]] = {"/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
LORA_BODIES: dict[str, type[BaseModel]] = {
    "/v1/load_lora_adapter": LoadLoRAAdapterRequest, "/v1/unload_lora_adapter": UnloadLoRAAdapterRequest,
}


_ERROR = {
    "description": 'an OpenAI-style error: {"error": {"message", "type", "param", "code"}}',
    "content": {"application/json": {"schema": {"type": "object"}}},
}


def _operation(path: str, schema: dict[str, Any]) -> dict[str, Any]:
    name = path.removeprefix("/v1/").replace("/", "_")
    return {
        "summary": f"Create {name.replace('_', ' ').title()}",
        "operationId": f"create_{name}_proxy",
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {
            "200": {
                "description": "the instance's answer: JSON, or an SSE stream with `stream: true`",
                "content": {"application/json": {"schema": {}}, "text/event-stream": {"schema": {}}},
            },
            "4XX": _ERROR,
            "5XX": _ERROR,
        },
    }


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` also document the generation paths (with their request bodies)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            comps = spec.setdefault("components", {}).setdefault("schemas", {})
            for ops in spec.get("paths", {}).values():
                for op in ops.values():
                    comps.update(op.pop("x-components", {}))
            for path, model in GENERATION_BODIES.items():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(schema.pop("$defs", {}))
                spec.setdefault("paths", {})[path] = {"post": _operation(path, schema)}
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
