"""`--api-key`: the /v1 routes want `Authorization: Bearer <key>` (health and metrics stay open)."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from pdserve.server.context import get_context
from pdserve.server.errors import APIError


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless the bearer token matches (constant-time comparison)."""
    expected = get_context(request).settings.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(
            401,
            "missing or incorrect API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
