"""X-Request-Id: take the client's (the proxy pairs prefill and decode halves with it) or make
one; echo it on every response. Pure ASGI middleware (no body buffering, streams untouched)."""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.server.errors import APIError

HEADER = "x-request-id"
_SCOPE_KEY = "pdserve.request_id"
_VALID = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII: what proxies put in ids (vLLM's embed addresses)


def request_id_of(request: Request) -> str:
    return request.scope[_SCOPE_KEY]


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == HEADER.encode()), None)
        request_id = given if given is not None else uuid.uuid4().hex
        raw = request_id.encode("latin-1", "replace")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), raw)]
            await send(message)

        if not _VALID.fullmatch(request_id):
            err = APIError(
                400,
                "X-Request-Id must be 1-256 visible ASCII characters",
                code="invalid_value",
                param="X-Request-Id",
            )
            await err.response()(scope, receive, send)
            return
        scope[_SCOPE_KEY] = request_id
        await self.app(scope, receive, send_with_id)
