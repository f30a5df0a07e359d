"""A response after its create call: `GET /v1/responses/{id}` (with `?stream=true&starting_after=n`,
a streamed background response's events again), `DELETE /v1/responses/{id}` and
`POST /v1/responses/{id}/cancel`, as OpenAI defines them. A response is found while it runs in the
background (background.py) or once stored (store.py); otherwise its id is a 404 `response_not_found`
(never made here, made with `store: false`, forgotten, or deleted).

Cancel: a running background response is stopped (its engine request aborted, its KV blocks freed)
and answered once it has ended, "cancelled"; a background response that has already ended is
answered as it is (OpenAI: cancelling is idempotent); one made without `background` is a 400.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pdserve.server import sse
from pdserve.server.context import ServerContext, get_context
from pdserve.server.errors import APIError, validation_error
from pdserve.server.responses.objects import DeletedResponse
from pdserve.server.responses.store import StoredResponse

CANCEL_WAIT_S = 5.0  # how long a cancel waits for the engine to end the request (one step; under the proxy's 10 s)


class RetrieveParams(BaseModel):
    """GET's query parameters (`include` and the others OpenAI defines are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    stream: bool = False
    starting_after: Annotated[int, Field(ge=-1)] | None = None  # the sequence number of the last event seen


def not_found(response_id: str) -> APIError:
    return APIError(
        404,
        f"no response '{response_id}' is stored on this server (never made here, made with "
        "store: false, forgotten, or deleted)",
        code="response_not_found",
        param="response_id",
    )


def find(ctx: ServerContext, response_id: str) -> StoredResponse:
    """The response as it is now (running or stored), or the 404."""
    entry = ctx.background.find(response_id)
    if entry is None:
        raise not_found(response_id)
    return entry


def _json(entry: BaseModel) -> Response:
    return Response(entry.model_dump_json(by_alias=True).encode(), media_type="application/json")


async def retrieve_response(request: Request) -> Response:
    """`GET /v1/responses/{response_id}`: the response as it is now; with `stream=true`, its events
    after `starting_after` (a streamed background response's only), then the new ones until it ends."""
    ctx = get_context(request)
    entry = find(ctx, request.path_params["response_id"])
    try:
        params = RetrieveParams.model_validate(dict(request.query_params))
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    if not params.stream:
        return _json(entry.response)
    if entry.events is None:
        raise APIError(
            400,
            "only a response created with background and stream both true can be streamed again",
            code="invalid_value",
            param="stream",
        )
    return StreamingResponse(
        entry.events.follow(params.starting_after), media_type="text/event-stream", headers=sse.HEADERS
    )


async def delete_response(request: Request) -> Response:
    """`DELETE /v1/responses/{response_id}`: forget it (a running one is stopped first)."""
    ctx = get_context(request)
    response_id = request.path_params["response_id"]
    if not (ctx.background.delete(response_id) or ctx.responses.delete(response_id)):
        raise not_found(response_id)
    return _json(DeletedResponse(id=response_id))


async def cancel_response(request: Request) -> Response:
    """`POST /v1/responses/{response_id}/cancel`: stop a background response."""
    ctx = get_context(request)
    response_id = request.path_params["response_id"]
    run = ctx.background.get(response_id)
    if run is not None:
        run.cancel()
        await run.wait(CANCEL_WAIT_S)
        return _json(run.entry.response)
    entry = find(ctx, response_id)
    if not entry.response.background:
        raise APIError(
            400,
            f"response '{response_id}' was not created with background: true; only a background "
            "response can be cancelled",
            code="invalid_value",
            param="response_id",
        )
    return _json(entry.response)
