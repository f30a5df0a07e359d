"""The proxy's routes for a response after its create call, each answered by the decode (standard
mode: standalone) instance that holds the response (responses.py): the request goes to every healthy
one at once and the holder's answer (any but a 404) comes back as it is; none holds it — never made,
forgotten, deleted, or its instance is gone — : 404 `response_not_found`.

GET    /v1/responses/{id}              the response; with `stream=true`, its events (a streamed
                                       background response's), relayed from the holder as they come
DELETE /v1/responses/{id}
POST   /v1/responses/{id}/cancel
GET    /v1/responses/{id}/input_items  `limit`, `order`, `after`, as OpenAI's; judged by the holder
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from pdserve.proxy.errors import ProxyError
from pdserve.proxy.instances import ROLE_NAMES, InstanceTable, RoleCode
from pdserve.proxy.relay import check_api_key
from pdserve.proxy.responses import RESPONSES_PATH, ask_holder, find_stored, stored_path
from pdserve.proxy.settings import ProxySettings
from pdserve.proxy.upstream import Buffered, Stream, Upstream, UpstreamFailure

_ROUTE = RESPONSES_PATH + "/{response_id}"


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_RETRIEVE_PARAMS = [
    _query("stream", {"type": "boolean"}, "stream a background response's events again"),
    _query("starting_after", {"type": "integer", "minimum": -1}, "the sequence number of the last event seen"),
]
_LIST_PARAMS = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "items per page (default 20)"),
    _query("order", {"type": "string", "enum": ["asc", "desc"]}, "desc (the default): the last item first"),
    _query("after", {"type": "string"}, "the id of the item the page starts after"),
]


def _answer(got: Buffered) -> Response:
    return Response(got.body, status_code=got.status, media_type=got.content_type or "application/json")


def _error(err: ProxyError) -> Response:
    return Response(err.body(), status_code=err.status, media_type="application/json")


def _relay(stream: Stream) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        try:
            yield stream.first
            while chunk := await stream.read():
                yield chunk
        finally:
            stream.close()  # a client gone early: the holder's stream ends, the response runs on

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def install_response_routes(app: FastAPI, settings: ProxySettings, upstream: Upstream, table: InstanceTable) -> None:
    """Add the routes above to the proxy's admin app."""
    role: RoleCode = "S" if settings.mode == "standard" else "D"

    def not_found(response_id: str) -> ProxyError:
        return ProxyError(
            404,
            f"no response '{response_id}' is stored on any {ROLE_NAMES[role]} instance",
            code="response_not_found",
            param="response_id",
        )

    def authorized(request: Request) -> dict[str, str]:
        """The headers for the instances; a ProxyError (401) for a client without the proxy's key."""
        check_api_key(request.headers.raw, settings.api_key)
        return upstream.auth_headers(request.headers.get("authorization"))

    async def to_holder(request: Request, response_id: str, rest: str = "") -> Response:
        try:
            headers = authorized(request)
        except ProxyError as e:
            return _error(e)
        path = stored_path(response_id, rest) + (f"?{request.url.query}" if request.url.query else "")
        got = await ask_holder(upstream, table.candidates(role), request.method, path, headers)
        return _error(not_found(response_id)) if got is None else _answer(got)

    @app.get(_ROUTE, openapi_extra={"parameters": _RETRIEVE_PARAMS})
    async def retrieve_route(request: Request, response_id: str) -> Response:
        """A response (running or stored) from the instance that holds it."""
        if "stream" not in request.query_params:
            return await to_holder(request, response_id)
        try:  # found first, then streamed from that instance (its events come as they are made)
            headers = authorized(request)
        except ProxyError as e:
            return _error(e)
        found = await find_stored(upstream, table.candidates(role), response_id, headers)
        if found is None:
            return _error(not_found(response_id))
        path = f"{stored_path(response_id)}?{request.url.query}"
        try:
            got = await upstream.call(found[0], path, None, headers, method="GET")
        except UpstreamFailure as e:
            return _error(ProxyError(502, f"the instance that holds the response failed: {e}", code="upstream_error"))
        return _relay(got) if isinstance(got, Stream) else _answer(got)

    @app.delete(_ROUTE)
    async def delete_route(request: Request, response_id: str) -> Response:
        """Delete a response (a running one is stopped first) on the instance that holds it."""
        return await to_holder(request, response_id)

    @app.post(_ROUTE + "/cancel")
    async def cancel_route(request: Request, response_id: str) -> Response:
        """Cancel a background response on the instance that runs it."""
        return await to_holder(request, response_id, "/cancel")

    @app.get(_ROUTE + "/input_items", openapi_extra={"parameters": _LIST_PARAMS})
    async def input_items_route(request: Request, response_id: str) -> Response:
        """A page of a response's input items, from the instance that holds it."""
        return await to_holder(request, response_id, "/input_items")
