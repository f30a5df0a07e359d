"""The proxy's ASGI app: the two generation paths (raw ASGI, see relay.py) and the admin routes.

GET /health     200 when the topology can serve (disagg: a healthy prefill and a healthy decode
                instance; standard: one instance), else 503 with the reason
GET, POST /ping vLLM's (SageMaker's health check): /health's answer
GET /version    vLLM's: {"version": pdserve's version}
GET /instances  every known instance, its state and load (JSON list)
GET /metrics    Prometheus text
GET /v1/models  from a healthy instance
POST /v1/embeddings  to an instance (disagg: a prefill, else a decode), orchestrate.py
GET, DELETE /v1/responses/{id}, POST .../cancel, GET .../input_items  from the decode (standalone)
                instance that holds the response (response_routes.py)
GET /openapi.json  the OpenAPI schema (openapi.py), the generation paths' request bodies included
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve import __version__
from pdserve.config import CORSConfig
from pdserve.proxy.errors import ProxyError, no_instance
from pdserve.proxy.health import HealthChecker
from pdserve.proxy.instances import ROLE_NAMES, Instance, InstanceTable, RoleCode
from pdserve.proxy.metrics import ProxyMetrics
from pdserve.proxy.openapi import LORA_BODIES, TOKENIZER_BODIES, install_openapi
from pdserve.proxy.orchestrate import CHAT_PATH, EMBEDDINGS_PATH, Orchestrator
from pdserve.proxy.registry import RegistryServer, sweep_forever
from pdserve.proxy.relay import ClientGone, ProxyEndpoint, check_api_key, read_body
from pdserve.proxy.response_routes import install_response_routes
from pdserve.proxy.responses import RESPONSES_PATH
from pdserve.proxy.routing import make_picker
from pdserve.proxy.settings import ProxySettings
from pdserve.proxy.upstream import Buffered, Upstream, UpstreamFailure
from pdserve.server.frontend_args import cors_middleware_options
from pdserve.server.prometheus import CONTENT_TYPE
from pdserve.server.protocol import openapi_body

log = logging.getLogger(__name__)


class InstanceView(msgspec.Struct):
    """One row of GET /instances."""

    address: str
    url: str
    role: str
    source: str  # "registered" or "static"
    healthy: bool
    in_flight: int
    requests: int
    failures: int
    engine_id: str
    kv_host: str
    handshake_port: int
    notify_port: int
    transfer_mode: str | None
    last_seen_s_ago: float | None

    @classmethod
    def of(cls, i: Instance, now: float) -> InstanceView:
        return cls(
            i.address,
            i.url,
            ROLE_NAMES[i.role],
            "static" if i.static else "registered",
            i.healthy,
            i.in_flight,
            i.requests,
            i.failures,
            i.engine_id,
            i.kv_host,
            i.handshake_port,
            i.notify_port,
            i.transfer_mode,
            round(now - i.last_seen, 3) if i.last_seen else None,
        )


@dataclass
class ProxyState:
    """Everything one proxy app owns."""

    settings: ProxySettings
    table: InstanceTable
    upstream: Upstream
    registry: RegistryServer | None
    metrics: ProxyMetrics
    orchestrator: Orchestrator
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def unavailable_reason(self) -> str | None:
        """Why the topology cannot serve now (None: it can)."""
        roles: tuple[RoleCode, ...] = ("S",) if self.settings.mode == "standard" else ("P", "D")
        missing = [ROLE_NAMES[r] for r in roles if not self.table.candidates(r)]
        return f"no healthy {' and no healthy '.join(missing)} instance" if missing else None


def build_state(settings: ProxySettings) -> ProxyState:
    table = InstanceTable(settings)
    registry = None
    if settings.registry_port is not None:
        registry = RegistryServer(table, settings.registry_host, settings.registry_port, settings.registry_token)
    metrics = ProxyMetrics(table, registry.stats if registry else None)
    upstream = Upstream(settings, table)
    orchestrator = Orchestrator(settings, table, upstream, make_picker(settings.routing), metrics)
    return ProxyState(settings, table, upstream, registry, metrics, orchestrator)


def _upstream_error(got: Buffered) -> ProxyError:
    """An instance's 4xx as a ProxyError (its OpenAI error's message, code and param when it sent one)."""
    try:
        info = msgspec.json.decode(got.body)["error"]
        code = str(info.get("code") or "upstream_error")
        return ProxyError(got.status, str(info["message"]), code, info.get("param"))
    except (msgspec.DecodeError, KeyError, TypeError):
        return ProxyError(got.status, f"HTTP {got.status}: {got.body[:300].decode(errors='replace')}", "upstream_error")


def _error(err: ProxyError) -> Response:
    return Response(err.body(), status_code=err.status, media_type="application/json")


def route_path(scope: Scope) -> str:
    """The request's path without the --root-path prefix uvicorn puts before it (as Starlette's routing
    reads it): what the proxy matches and forwards to instances."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class ProxyApp:
    """The ASGI app: POSTs to the generation paths go straight to their endpoint (no routing and no
    middleware but CORS, which passes a request without an Origin header straight through: the
    proxy's own latency counts), everything else to the FastAPI admin app."""

    def __init__(self, admin: FastAPI, hot: dict[str, ProxyEndpoint], cors: CORSConfig | None = None) -> None:
        self.admin = admin
        self.hot = hot
        self.state = admin.state
        self._app: ASGIApp = self._dispatch
        if cors is not None and cors.allowed_origins:  # vLLM's CORS flags
            self._app = CORSMiddleware(self._dispatch, **cors_middleware_options(cors))  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.hot.get(route_path(scope))
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.admin(scope, receive, send)


def build_app(settings: ProxySettings) -> ProxyApp:
    state = build_state(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        session = await state.upstream.start()
        health = HealthChecker(state.table, session, state.upstream.auth_headers(None))
        if state.registry is not None:
            state.registry.bind()
            state.tasks.append(asyncio.create_task(state.registry.serve_forever()))
        interval = min(0.25, settings.heartbeat_timeout_s / 4)
        state.tasks.append(asyncio.create_task(sweep_forever(state.table, interval)))
        if state.table.static():
            await health.check_all()
            state.tasks.append(asyncio.create_task(health.run_forever()))
        log.info(
            "proxy ready: mode %s%s, routing %s",
            settings.mode,
            f" ({settings.kv_mode})" if settings.mode == "disagg" else "",
            settings.routing,
        )
        try:
            yield
        finally:
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            if state.registry is not None:
                state.registry.close()
            state.orchestrator.close()
            await state.upstream.stop()

    app = FastAPI(title="pdserve proxy", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_openapi(app)  # GET /openapi.json, the generation paths' request bodies included
    app.state.proxy = state
    hot = {
        path: ProxyEndpoint(path, state.orchestrator, state.metrics, settings.api_key)
        for path in ("/v1/completions", CHAT_PATH, RESPONSES_PATH, EMBEDDINGS_PATH)
    }
    for path, endpoint in hot.items():
        app.router.routes.append(Route(path, endpoint, methods=["POST"]))

    @app.get("/health")
    async def health_route() -> Response:
        reason = state.unavailable_reason()
        if reason is not None:
            return _error(ProxyError(503, reason, code="no_instance"))
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/ping")
    @app.post("/ping")
    async def ping_route() -> Response:
        """vLLM's SageMaker health check: /health's answer."""
        return await health_route()

    @app.get("/version")
    async def version_route() -> Response:
        return Response(msgspec.json.encode({"version": __version__}), media_type="application/json")

    @app.get("/instances")
    async def instances_route() -> Response:
        now = time.monotonic()
        rows = [InstanceView.of(i, now) for i in state.table.all()]
        return Response(msgspec.json.encode(rows), media_type="application/json")

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    async def any_instance(request: Request, body: bytes | None = None) -> Response:
        """Answer from an instance (decode first in disagg mode; a second one if it fails)."""
        try:
            check_api_key(request.headers.raw, settings.api_key)
        except ProxyError as e:
            return _error(e)
        roles: tuple[RoleCode, ...] = ("S",) if settings.mode == "standard" else ("D", "P")
        headers = state.upstream.auth_headers(request.headers.get("authorization"))
        if body is not None:
            headers["Content-Type"] = "application/json"
        # dict.fromkeys: a both instance is a candidate of both roles, tried once
        for inst in list(dict.fromkeys(i for r in roles for i in state.table.candidates(r)))[:2]:
            try:
                got = await state.upstream.fetch(inst, request.method, route_path(request.scope), headers, body)
            except UpstreamFailure as e:
                log.warning("%s %s: %s", request.method, route_path(request.scope), e)
                continue
            return Response(got.body, status_code=got.status, media_type=got.content_type or "application/json")
        return _error(no_instance("decode" if settings.mode == "disagg" else "standalone"))

    @app.get("/v1/models")
    async def models_route(request: Request) -> Response:
        return await any_instance(request)

    install_response_routes(app, settings, state.upstream, state.table)  # GET, DELETE, cancel, input_items

    async def tokenizer_route(request: Request) -> Response:
        """vLLM's /tokenize and /detokenize: every instance serves the same model and tokenizer."""
        try:
            body = await read_body(request.scope, request.receive, settings.max_body_bytes)
        except ProxyError as e:
            return _error(e)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        return await any_instance(request, body)

    for path, model in TOKENIZER_BODIES.items():
        app.add_api_route(path, tokenizer_route, methods=["POST"], openapi_extra=openapi_body(model))

    async def every_instance(request: Request, path: str) -> Response:
        """POST the request's body to every healthy instance (each must do it: forget its prefix
        cache, load or unload an adapter). One row per instance: its answer's JSON, or its text as
        `message`, or its `error`. Every instance 200: 200; all refused alike (a 4xx): that status;
        otherwise 502. None up: 503."""
        try:
            check_api_key(request.headers.raw, settings.api_key)
            body = await read_body(request.scope, request.receive, settings.max_body_bytes)
        except ProxyError as e:
            return _error(e)
        except ClientGone:
            return Response(status_code=499)
        headers = state.upstream.auth_headers(request.headers.get("authorization"))
        if body:
            headers["Content-Type"] = "application/json"
        targets = sorted((i for i in state.table.all() if i.healthy), key=lambda i: i.address)
        if not targets:
            return _error(ProxyError(503, "no healthy instance", code="no_instance"))

        async def one(inst: Instance) -> tuple[int, dict[str, object], ProxyError | None]:
            row: dict[str, object] = {"address": inst.address, "role": ROLE_NAMES[inst.role]}
            try:
                got = await state.upstream.fetch(inst, "POST", path, headers, body or None)
            except UpstreamFailure as e:
                return 502, row | {"error": str(e)}, ProxyError(502, str(e), code="upstream_error")
            text = got.body.decode(errors="replace")
            if got.status != 200:
                return got.status, row | {"error": f"HTTP {got.status}: {text[:300]}"}, _upstream_error(got)
            if got.content_type == "application/json":
                return 200, row | msgspec.json.decode(got.body), None
            return 200, row | {"message": text}, None

        answers = await asyncio.gather(*(one(i) for i in targets))
        statuses = {code for code, _, _ in answers}
        status = statuses.pop() if len(statuses) == 1 else 502
        rows = [row for _, row, _ in answers]
        out: dict[str, object] = {"instances": rows}
        failed = [err for _, _, err in answers if err is not None]
        if failed:  # OpenAI's error shape, from the first instance that refused; every row below
            first = failed[0]
            message = f"{len(failed)} of {len(rows)} instances failed; the first: {first.message}"
            out = msgspec.json.decode(ProxyError(status, message, first.code, first.param).body()) | out
        return Response(msgspec.json.encode(out), status_code=status, media_type="application/json")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache_route(request: Request) -> Response:
        """Every healthy instance forgets its prefix cache's free blocks (vLLM's route; between
        benchmark runs)."""
        return await every_instance(request, "/reset_prefix_cache")

    async def lora_route(request: Request) -> Response:
        """vLLM's runtime LoRA routes, on every healthy instance: a disaggregated request runs its
        adapter on both halves."""
        return await every_instance(request, route_path(request.scope))

    for path, model in LORA_BODIES.items():
        app.add_api_route(path, lora_route, methods=["POST"], openapi_extra=openapi_body(model))

    return ProxyApp(app, hot, settings.frontend.cors)
