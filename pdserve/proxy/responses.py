"""Stored responses behind the proxy (OpenAI's Responses API, `/v1/responses`).

A stored response lives on the instance that made it — a decode instance in disagg mode (the
prefill half is sent `store: false`), a standalone one in standard mode — and the proxy keeps no
record of it (nothing to lose on a proxy restart, nothing to bound). So it asks:

* `GET /v1/responses/{id}`, `DELETE` it, `POST .../cancel`, `GET .../input_items`: every healthy
  decode (standalone) instance at once (response_routes.py); the one that has it answers (any answer
  but a 404); none: a 404 `response_not_found`.
* A request with `previous_response_id` goes whole to the instance that has that response, which
  prefills it itself (the earlier turns are in its prefix cache): no KV transfer, counted as the
  fallback "previous_response" in disagg mode. No instance has it: a 400 naming
  `previous_response_id`. A response is gone with its instance (restart) or when its LRU store
  (`pdserve serve --max-stored-responses`) forgets it.
* A background response (`background: true`) runs on the instance that answered its create call
  (in disagg mode the decode, after the prefill half as usual): the proxy holds the client's request
  no longer than the instance's answer (and, in WRITE mode, the prefill half's), never for the whole
  generation. A decode that accepted one for a pair that then failed is told to delete it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from urllib.parse import quote

import msgspec

from pdserve.proxy.errors import ProxyError
from pdserve.proxy.instances import Instance
from pdserve.proxy.upstream import Buffered, Stream, Upstream, UpstreamFailure

log = logging.getLogger(__name__)

RESPONSES_PATH = "/v1/responses"
_CREATED_ID = re.compile(rb'"type":"response.created","response":\{"id":"([^"]+)"')


async def _first_holder(
    upstream: Upstream,
    instances: list[Instance],
    method: str,
    path: str,
    headers: dict[str, str],
    holds: Callable[[Buffered], bool],
) -> tuple[Instance, Buffered] | None:
    """`method path` on every instance at once: the first (in `instances`' order) whose answer
    `holds` says it holds the response, with that answer; None when none does."""

    async def ask(inst: Instance) -> tuple[Instance, Buffered] | None:
        try:
            got = await upstream.fetch(inst, method, path, headers)
        except UpstreamFailure:
            return None
        return (inst, got) if holds(got) else None

    found = [f for f in await asyncio.gather(*(ask(i) for i in instances)) if f is not None]
    return found[0] if found else None


async def find_stored(
    upstream: Upstream, instances: list[Instance], response_id: str, headers: dict[str, str]
) -> tuple[Instance, Buffered] | None:
    """The instance that holds the stored response `response_id`, and its answer (the response)."""
    return await _first_holder(
        upstream, instances, "GET", stored_path(response_id), headers, lambda got: got.status == 200
    )


async def ask_holder(
    upstream: Upstream, instances: list[Instance], method: str, path: str, headers: dict[str, str]
) -> Buffered | None:
    """`method path` (`path` naming a response, query included) on every instance at once: the answer
    of the one that holds the response — any answer but a 404, the others' (not stored there) — or
    None when none does. An instance looks the response up before it judges the rest (its 400s)."""
    found = await _first_holder(upstream, instances, method, path, headers, lambda got: got.status != 404)
    return found[1] if found else None


def not_stored(response_id: str, where: str) -> ProxyError:
    """A `previous_response_id` that no instance holds."""
    return ProxyError(
        400,
        f"previous response '{response_id}' is not stored on any {where} instance (never made, "
        "made with store: false, forgotten, or its instance restarted)",
        code="previous_response_not_found",
        param="previous_response_id",
    )


def stored_path(response_id: str, rest: str = "") -> str:
    """`/v1/responses/{id}` (+ `rest`, e.g. "/cancel"), the id quoted."""
    return f"{RESPONSES_PATH}/{quote(response_id, safe='')}{rest}"


def background_id(reply: Buffered | Stream) -> str | None:
    """The id of the background response an instance accepted: its answer's, or its stream's first
    event's (None: not a 200, or no id found)."""
    if isinstance(reply, Stream):
        found = _CREATED_ID.search(reply.first)
        return found.group(1).decode() if found else None
    if reply.status != 200:
        return None
    try:
        answer = msgspec.json.decode(reply.body)
    except msgspec.DecodeError:
        return None
    response_id = answer.get("id") if isinstance(answer, dict) else None
    return response_id if isinstance(response_id, str) else None


async def delete_stored(upstream: Upstream, inst: Instance, response_id: str, headers: dict[str, str]) -> None:
    """DELETE the response on `inst` (a failure is logged: the response then fails on its own, once
    its KV transfer times out)."""
    try:
        got = await upstream.fetch(inst, "DELETE", stored_path(response_id), headers)
    except UpstreamFailure as e:
        log.warning("could not delete background response %s on %s: %s", response_id, inst.address, e)
        return
    log.info("background response %s of a failed pair deleted on %s (HTTP %d)", response_id, inst.address, got.status)
