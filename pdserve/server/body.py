"""Read a JSON request body under a size limit and validate it into a protocol model."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from pdserve.server.errors import APIError, from_pydantic

M = TypeVar("M", bound=BaseModel)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed `limit` (from Content-Length, before
    reading anything, or while streaming a chunked body): an oversized body is never buffered."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header", code="invalid_value")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body", code="client_disconnected") from None
    return b"".join(chunks)


async def parse_body(request: Request, model: type[M], limit: int) -> M:
    """Read and validate: invalid JSON, wrong types and missing fields are 400s (never 422/500)."""
    body = await read_body(request, limit)
    if not body.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_pydantic(e) from None
