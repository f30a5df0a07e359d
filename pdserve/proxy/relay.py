"""The ASGI endpoint of `/v1/completions` and `/v1/chat/completions`: read the body, orchestrate,
then send the reply — a complete response as is, or an SSE stream relayed chunk by chunk.

Streams are passed through unchanged, except that a partial event is held back until it is
complete, so that when the upstream fails mid-stream the client receives whole events, then
`data: {"error": {...}}` and `data: [DONE]`, and the stream closes. A client that disconnects
(at any point) cancels the work: the upstream connections close and the instances abort.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid

import aiohttp
import anyio
from starlette.types import Message, Receive, Scope, Send

from pdserve.proxy.errors import ProxyError, sse_error_event
from pdserve.proxy.metrics import ProxyMetrics
from pdserve.proxy.orchestrate import ClientRequest, Orchestrator
from pdserve.proxy.upstream import Buffered, Stream

log = logging.getLogger(__name__)

_DONE = b"data: [DONE]"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


class ClientGone(Exception):
    """The client disconnected while its body was being read."""


def split_events(data: bytes) -> tuple[bytes, bytes]:
    """(whole events, the partial one after them) of SSE bytes."""
    cut = data.rfind(b"\n\n")
    end = cut + 2 if cut >= 0 else 0
    crlf = data.rfind(b"\r\n\r\n")
    if crlf >= 0 and crlf + 4 > end:
        end = crlf + 4
    return (data, b"") if end == len(data) else (data[:end], data[end:])


def check_api_key(headers: list[tuple[bytes, bytes]], api_key: str | None) -> None:
    if api_key is None:
        return
    given = next((v for k, v in headers if k == b"authorization"), b"")
    if not hmac.compare_digest(given, b"Bearer " + api_key.encode()):
        raise ProxyError(401, "invalid or missing API key", code="invalid_api_key")


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for k, v in scope["headers"]:
        if k == b"content-length" and v.isdigit() and int(v) > limit:
            raise ProxyError(413, f"the body exceeds {limit} bytes", code="body_too_large")
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProxyError(413, f"the body exceeds {limit} bytes", code="body_too_large")
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


class ProxyEndpoint:
    """ASGI app for one OpenAI generation path."""

    def __init__(self, path: str, orchestrator: Orchestrator, metrics: ProxyMetrics, api_key: str | None) -> None:
        self.path = path
        self.orchestrator = orchestrator
        self.metrics = metrics
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrival = time.perf_counter()
        request_id = uuid.uuid4().hex
        rid_header = (b"x-request-id", request_id.encode())
        try:
            check_api_key(scope["headers"], self.api_key)
            raw = await read_body(scope, receive, self.orchestrator.settings.max_body_bytes)
        except ProxyError as e:
            await self._send_error(send, e, rid_header)
            self.metrics.requests.inc(labels=("client_error",))
            return
        except ClientGone:
            self.metrics.requests.inc(labels=("cancelled",))
            return
        auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        req = ClientRequest(self.path, raw, request_id, auth, arrival)
        client_scope = anyio.CancelScope()
        watcher = asyncio.ensure_future(_watch_disconnect(receive))
        watcher.add_done_callback(lambda t: None if t.cancelled() else client_scope.cancel())
        outcome = "internal_error"
        try:
            with client_scope:
                outcome = await self._serve(req, send, rid_header)
            if client_scope.cancelled_caught:
                outcome = "cancelled"
        except OSError:  # the client went away while we were writing to it
            outcome = "cancelled"
        finally:
            watcher.cancel()
            self.metrics.requests.inc(labels=(outcome,))

    async def _serve(self, req: ClientRequest, send: Send, rid_header: tuple[bytes, bytes]) -> str:
        try:
            reply = await self.orchestrator.serve(req)
        except ProxyError as e:
            await self._send_error(send, e, rid_header)
            return "unavailable" if e.status == 503 else "upstream_error" if e.status >= 500 else "client_error"
        except Exception:
            log.exception("request %s failed", req.request_id)
            await self._send_error(send, ProxyError(500, "internal proxy error", "internal_error"), rid_header)
            return "internal_error"
        if isinstance(reply, Buffered):
            ctype = (reply.content_type or "application/json").encode()
            await send({"type": "http.response.start", "status": reply.status, "headers": [
                (b"content-type", ctype), (b"content-length", str(len(reply.body)).encode()), rid_header]})
            await send({"type": "http.response.body", "body": reply.body})
            return "ok" if reply.status < 400 else "client_error" if reply.status < 500 else "upstream_error"
        try:
            return await self._relay(reply, send, rid_header)
        finally:
            reply.close()

    async def _relay(self, stream: Stream, send: Send, rid_header: tuple[bytes, bytes]) -> str:
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, rid_header]})
        out, pending = split_events(stream.first)
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
        self.metrics.response_overhead.observe(time.perf_counter() - stream.first_byte_at)
        last = out
        failure: str | None = None
        lease = stream.lease
        with anyio.CancelScope() as scope:
            lease.scope = scope
            if lease.lost is not None:
                scope.cancel()
            while True:
                try:
                    chunk = await stream.read()
                except (aiohttp.ClientError, OSError) as e:
                    failure = f"the {stream.instance.address} stream broke: {type(e).__name__}: {e}"
                    self.orchestrator.upstream.suspect(stream.instance)
                    break
                if not chunk:
                    break
                out, pending = split_events(pending + chunk if pending else chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    last = out
        if scope.cancelled_caught:
            failure = f"upstream {stream.instance.address} lost: {lease.lost}"
        done = _DONE in last[-20:]
        if failure is not None and not done:
            log.warning("stream failed mid-way: %s", failure)
            await send({"type": "http.response.body", "body": sse_error_event(failure), "more_body": False})
            return "stream_error"
        await send({"type": "http.response.body", "body": pending, "more_body": False})
        return "ok"

    async def _send_error(self, send: Send, err: ProxyError, rid_header: tuple[bytes, bytes]) -> None:
        body = err.body()
        await send({"type": "http.response.start", "status": err.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), rid_header]})
        await send({"type": "http.response.body", "body": body})


async def _watch_disconnect(receive: Receive) -> None:
    """Return when the client disconnects."""
    while True:
        msg: Message = await receive()
        if msg["type"] == "http.disconnect":
            return
