"""OpenAI-style errors made by the proxy itself: `{"error": {"message", "type", "param", "code"}}`.

Errors of an instance (a 4xx for bad input) are passed through untouched, never re-made here.
"""

from __future__ import annotations

import msgspec

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorInfo


class ProxyError(Exception):
    """The request cannot be served; `status` and `code` say why (503 no_instance, 502 upstream_error...)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> bytes:
        info = ErrorInfo(self.message, _TYPES.get(self.status, "server_error"), self.param, self.code)
        return msgspec.json.encode(ErrorBody(info))


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """The in-band error of a stream that already started: one event, then `[DONE]`."""
    body = msgspec.json.encode(ErrorBody(ErrorInfo(message, "server_error", None, code)))
    return b"data: " + body + b"\n\ndata: [DONE]\n\n"


def no_instance(role: str) -> ProxyError:
    return ProxyError(503, f"no healthy {role} instance is available", code="no_instance")
