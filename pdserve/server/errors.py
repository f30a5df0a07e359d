"""OpenAI-style errors: one exception type for the handlers, and the app's exception handlers.

Every error response has the body `{"error": {"message", "type", "param", "code"}}`. Bad input
is always a 4xx (FastAPI's 422 becomes a 400); a 500 means a bug in pdserve, never bad input.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException

from pdserve.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raise from a handler to answer with an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def info(self) -> ErrorInfo:
        return ErrorInfo(
            message=self.message,
            type=_TYPES.get(self.status, "invalid_request_error"),
            param=self.param,
            code=self.code,
        )

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.info).model_dump(mode="json")
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _loc(err: ErrorDetails) -> list[str]:
    # Drop pydantic's union-member tags ("str", "list[int]") so `param` names the client's field.
    return [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int")))]


def validation_error(errors: list[ErrorDetails]) -> APIError:
    """A 400 from pydantic errors: invalid JSON, a wrong type, a missing field, a bad value."""
    if any(e["type"] == "json_invalid" for e in errors):
        return APIError(400, f"the body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
    first = errors[0]
    loc = _loc(first)
    param = ".".join(loc) or None
    msg = first["msg"].removeprefix("Value error, ")
    if param is None:  # a request-level check: protocol.ParamError names the field in the message already
        named = getattr(first.get("ctx", {}).get("error"), "param", None)
        if isinstance(named, str):
            return APIError(400, msg, code="invalid_value", param=named)
    if param is not None:
        same = [e for e in errors if _loc(e)[:1] == loc[:1]]
        if len(same) > 1 and len({e["type"] for e in same}) > 1:
            msg = f"invalid value for '{loc[0]}' ({msg})"
        else:
            msg = f"{param}: {msg}"
    code = "missing_field" if first["type"] == "missing" else "invalid_value"
    return APIError(400, msg, code=code, param=param)


def from_pydantic(exc: ValidationError) -> APIError:
    return validation_error(exc.errors())


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request", code="invalid_value").response()
    return validation_error(errors).response()  # type: ignore[arg-type]


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return APIError(
        exc.status_code, str(exc.detail), code=codes.get(exc.status_code), headers=dict(exc.headers or {})
    ).response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
