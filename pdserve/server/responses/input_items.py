"""`GET /v1/responses/{response_id}/input_items`: the items a response was made from (items.py),
one page at a time, as OpenAI's list: `limit` (1 to 100, default 20), `order` ("desc", the default:
the last item first; or "asc"), `after` (an item id: the page starts after it, in that order);
`include` is accepted and ignored (text items have nothing more to include). A bad parameter, or an
`after` that names no item of the response, is a 400 naming it; an unknown response a 404 (looked
for first).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from pdserve.server.context import get_context
from pdserve.server.errors import APIError, validation_error
from pdserve.server.responses.items import ItemList, ListedItem
from pdserve.server.responses.manage import find


class ListParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    limit: Annotated[int, Field(ge=1, le=100)] = 20
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None


def page(items: list[ListedItem], params: ListParams) -> ItemList:
    """One page of `items` (in the response's order) as `params` ask."""
    ordered = items if params.order == "asc" else items[::-1]
    if params.after is not None:
        ids = [item.id for item in ordered]
        if params.after not in ids:
            raise APIError(
                400, f"after: no input item '{params.after}' in this response", code="invalid_value", param="after"
            )
        ordered = ordered[ids.index(params.after) + 1 :]
    data = ordered[: params.limit]
    return ItemList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(ordered) > params.limit,
    )


async def list_input_items(request: Request) -> Response:
    entry = find(get_context(request), request.path_params["response_id"])
    try:
        params = ListParams.model_validate(dict(request.query_params))
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    body = page(list(entry.input_items), params).model_dump_json(by_alias=True)
    return Response(body.encode(), media_type="application/json")
