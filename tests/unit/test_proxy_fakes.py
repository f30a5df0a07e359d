"""Helpers of the proxy's in-process tests (no tests here): fake instances and a proxy on loopback.

`FakeInstance` is a small aiohttp server speaking the instance side of docs/protocol.md (a
prefill half answers with `kv_transfer_params`; a WRITE decode half waits until its prefill peer
"wrote" the KV) with injectable failures, and records what it received (with `notify=True`, also
the notify messages sent to its notify port, e.g. the proxy's `Abort`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import msgspec
import uvicorn
import zmq
from aiohttp import web

from pdserve.kv.messages import NotifyMessage, decode_notify
from pdserve.proxy.app import ProxyState, build_app
from pdserve.proxy.settings import ProxySettings

Behavior = Literal["ok", "500", "400", "hang", "drop", "no_params", "refuse"]


@dataclass
class Seen:
    path: str
    request_id: str
    auth: str | None
    body: dict[str, Any]


@dataclass
class KVBus:
    """Shared by the fakes of one test: a WRITE decode half waits until the prefill half "wrote"."""

    mode: Literal["READ", "WRITE"] = "READ"  # what the fakes' /kv_info reports
    written: dict[str, asyncio.Event] = field(default_factory=dict)

    def event(self, request_id: str) -> asyncio.Event:
        return self.written.setdefault(request_id, asyncio.Event())


class FakeInstance:
    def __init__(
        self,
        role: Literal["P", "D", "S"],
        bus: KVBus | None = None,
        behavior: Behavior = "ok",
        tokens: int = 4,
        delay_s: float = 0.0,
        drop_after: int = 2,
        engine_id: str | None = None,
        early_chunk: bool = False,
        notify: bool = False,
    ) -> None:
        self.role = role
        self.bus = bus or KVBus()
        self.behavior = behavior
        self.tokens = tokens
        self.delay_s = delay_s
        self.drop_after = drop_after
        self.engine_id = engine_id or f"engine-{role}-{id(self) % 10000}"
        self.early_chunk = early_chunk  # a streamed decode half sends a first chunk before it has the KV
        self.seen: list[Seen] = []
        self.deleted: list[str] = []  # DELETE /v1/responses/{id} received
        self.cancelled = 0  # requests whose connection the proxy closed before they ended
        self.healthy = True  # what GET /health says
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.notified: list[NotifyMessage] = []  # what arrived on the notify port (see `notify_messages`)
        self._zmq: zmq.Context | None = zmq.Context() if notify else None
        self._notify: zmq.Socket | None = None
        self._notify_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def notify_port(self) -> int:
        """A real ZMQ ROUTER with `notify=True`; otherwise a port nothing listens on."""
        return self._notify_port or self.port + 2

    def notify_messages(self) -> list[NotifyMessage]:
        """Every notify message received so far (reads what has arrived, without waiting)."""
        while self._notify is not None:
            try:
                frames = self._notify.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.notified.append(decode_notify(frames[-1]))
        return self.notified

    async def start(self) -> FakeInstance:
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/responses", self._generate)
        app.router.add_delete("/v1/responses/{response_id}", self._delete)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/kv_info", self._kv_info)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        if self._zmq is not None and self._notify is None:
            self._notify = self._zmq.socket(zmq.ROUTER)
            self._notify.setsockopt(zmq.LINGER, 0)
            self._notify_port = self._notify.bind_to_random_port("tcp://127.0.0.1")
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._notify is not None:
            self._notify.close(0)
            self._notify = None
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None

    async def _delete(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        self.deleted.append(response_id)
        return web.json_response({"id": response_id, "object": "response", "deleted": True})

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.healthy else "draining"}, status=200 if self.healthy else 503)

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake"}]})

    async def _kv_info(self, _: web.Request) -> web.Response:
        role = {"P": "prefill", "D": "decode", "S": "standalone"}[self.role]
        return web.json_response(
            {
                "engine_id": self.engine_id,
                "host": "127.0.0.1",
                "handshake_port": self.port + 1,
                "notify_port": self.notify_port,
                "role": role,
                "transfer_mode": self.bus.mode,
            }
        )

    def params(self, request_id: str) -> dict[str, Any]:
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": [3, 1, 4],
            "remote_host": "127.0.0.1",
            "remote_port": self.port,
            "remote_handshake_port": self.port + 1,
            "remote_notify_port": self.notify_port,
            "transfer_mode": "READ",
            "lease_seconds": 30.0,
            "extra_field": request_id,
        }

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid = request.headers.get("X-Request-Id", "")
        self.seen.append(Seen(request.path, rid, request.headers.get("Authorization"), body))
        try:
            return await self._answer(request, body, rid)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise

    async def _answer(self, request: web.Request, body: dict[str, Any], rid: str) -> web.StreamResponse:
        if self.behavior == "500":
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        if self.behavior == "400":
            err = {
                "error": {
                    "message": "max_tokens: bad",
                    "type": "invalid_request_error",
                    "param": "max_tokens",
                    "code": "invalid_value",
                }
            }
            return web.json_response(err, status=400)
        if self.behavior == "hang":
            await asyncio.sleep(3600)
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):  # the prefill half
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if kv.get("transfer_mode") == "WRITE":
                self.bus.event(rid).set()
            params = None if self.behavior == "no_params" else self.params(rid)
            return web.json_response(
                {
                    "id": rid,
                    "choices": [{"index": 0, "text": "w0", "finish_reason": "length"}],
                    "kv_transfer_params": params,
                }
            )
        if body.get("background"):  # a background response: answered at once, generated later
            if self.delay_s:  # made already (a real server's survives its client), answered late
                await asyncio.sleep(self.delay_s)
            return web.json_response({"id": f"resp_{rid}", "object": "response", "status": "queued"})
        words = [f"w{i}" for i in range(self.tokens)]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if body.get("stream") and self.early_chunk:
            await resp.prepare(request)
            await resp.write(b'data: {"id": "%s", "choices": [{"index": 0, "text": ""}]}\n\n' % rid.encode())
        if kv.get("do_remote_prefill") and kv.get("transfer_mode") == "WRITE":
            await self.bus.event(rid).wait()
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": rid,
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": " ".join(words), "finish_reason": "length"}],
                }
            )
        if not resp.prepared:
            await resp.prepare(request)
        for i, w in enumerate(words):
            if self.behavior == "drop" and i == self.drop_after:
                await resp.write(b'data: {"partial": ')  # half an event, then the connection dies
                assert request.transport is not None
                request.transport.abort()
                return resp
            chunk = {"id": rid, "choices": [{"index": 0, "text": w, "finish_reason": None}]}
            await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningProxy:
    url: str
    state: ProxyState


@contextlib.asynccontextmanager
async def running_proxy(settings: ProxySettings) -> AsyncIterator[RunningProxy]:
    """The proxy app served by uvicorn on a free loopback port, in this event loop."""
    app = build_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the proxy did not start")
            await asyncio.sleep(0.005)
        yield RunningProxy(f"http://127.0.0.1:{port}", app.state.proxy)
    finally:
        server.should_exit = True
        await task
        sock.close()


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
) -> tuple[int, bytes, str]:
    """(status, body, X-Request-Id) of a POST; `timeout`: give up (and disconnect) after that long."""
    limit = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=timeout)}
    async with session.post(url, json=body, headers=headers or {}, **limit) as r:
        return r.status, await r.read(), r.headers.get("x-request-id", "")


def sse_events(raw: bytes) -> list[bytes]:
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
