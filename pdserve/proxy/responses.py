"""Stored responses behind the proxy (OpenAI's Responses API, `/v1/responses`).

A stored response lives on the instance that made it — a decode instance in disagg mode (the
prefill half is sent `store: false`), a standalone one in standard mode — and the proxy keeps no
record of it (nothing to lose on a proxy restart, nothing to bound). So it asks:

* `GET /v1/responses/{id}`: every healthy decode (standalone) instance at once; the first that has
  it answers; none: a 404.
* A request with `previous_response_id` goes whole to the instance that has that response, which
  prefills it itself (the earlier turns are in its prefix cache): no KV transfer, counted as the
  fallback "previous_response" in disagg mode. No instance has it: a 400 naming
  `previous_response_id`. A response is gone with its instance (restart) or when its LRU store
  (`pdserve serve --max-stored-responses`) forgets it.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from pdserve.proxy.errors import ProxyError
from pdserve.proxy.instances import Instance
from pdserve.proxy.upstream import Buffered, Upstream, UpstreamFailure

RESPONSES_PATH = "/v1/responses"


async def find_stored(
    upstream: Upstream, instances: list[Instance], response_id: str, headers: dict[str, str]
) -> tuple[Instance, Buffered] | None:
    """The instance that holds the stored response `response_id`, and its answer (the response)."""
    path = f"{RESPONSES_PATH}/{quote(response_id, safe='')}"

    async def ask(inst: Instance) -> tuple[Instance, Buffered] | None:
        try:
            got = await upstream.fetch(inst, "GET", path, headers)
        except UpstreamFailure:
            return None
        return (inst, got) if got.status == 200 else None

    found = [f for f in await asyncio.gather(*(ask(i) for i in instances)) if f is not None]
    return found[0] if found else None


def not_stored(response_id: str, where: str) -> ProxyError:
    """A `previous_response_id` that no instance holds."""
    return ProxyError(400, f"previous response '{response_id}' is not stored on any {where} instance (never made, "
                      "made with store: false, forgotten, or its instance restarted)",
                      code="previous_response_not_found", param="previous_response_id")
