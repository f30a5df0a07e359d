"""Calls to instances over one pooled aiohttp session, with failures sorted into what can be retried.

`Upstream.call` POSTs a JSON body and returns either a complete response (`Buffered`: any 4xx, a
non-streaming 200) or an open SSE stream whose first chunk has arrived (`Stream`): nothing has been
sent to the client yet, so every failure up to that point (refused connection, a 5xx, a timeout, an
eviction, a connection dropped before the first byte) is an `UpstreamFailure` the orchestrator may
retry on another instance. Each call holds a `Lease` on its instance (in-flight count); an eviction
aborts the call through the lease's cancel scope.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from dataclasses import dataclass
from typing import Literal

import aiohttp
import anyio

from pdserve.proxy.instances import Instance, InstanceTable, Lease
from pdserve.proxy.settings import InstanceTLS, ProxySettings

log = logging.getLogger(__name__)

FailureKind = Literal["unreachable", "status", "timeout", "evicted", "dropped"]
SSE_TYPE = "text/event-stream"


def instance_ssl_context(tls: InstanceTLS) -> ssl.SSLContext | None:
    """The context HTTPS instances are called with (None: aiohttp's default, the system's CAs).
    ValueError naming the flag when a file does not load."""
    if not tls.configured:
        return None
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_certs)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"--instance-ssl-ca-certs {tls.ca_certs}: cannot load: {e}") from None
    if tls.certfile is not None:
        try:
            ctx.load_cert_chain(tls.certfile, tls.keyfile)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"--instance-ssl-certfile {tls.certfile}: cannot load the certificate and its key: {e}"
                             ) from None
    return ctx


class UpstreamFailure(Exception):
    """An instance failed a call before anything reached the client; retrying elsewhere is safe."""

    def __init__(self, inst: Instance, kind: FailureKind, detail: str, status: int | None = None) -> None:
        super().__init__(f"{inst.address}: {kind}: {detail}")
        self.instance = inst
        self.kind = kind
        self.detail = detail
        self.status = status


@dataclass
class Buffered:
    """A complete upstream response, passed to the client as is (or parsed, for a prefill half)."""

    status: int
    content_type: str
    body: bytes


@dataclass
class Stream:
    """An open upstream SSE response whose first chunk has arrived. `close()` ends the call."""

    response: aiohttp.ClientResponse
    first: bytes
    lease: Lease
    table: InstanceTable
    first_byte_at: float  # time.perf_counter() of the first chunk

    @property
    def instance(self) -> Instance:
        return self.lease.instance

    ended: bool = False  # the whole body was read

    async def read(self) -> bytes:
        """The next chunk as it arrives; b"" at the end. Raises aiohttp.ClientError/OSError on a drop."""
        chunk = await self.response.content.readany()
        self.ended = not chunk
        return chunk

    def close(self) -> None:
        """End the call: a finished response's connection goes back to the pool; an unfinished one is
        closed (the instance aborts the request). Ends the lease."""
        if self.ended:
            self.response.release()
        else:
            self.response.close()
        self.table.release(self.lease)


class Upstream:
    """The proxy's client side: one pooled session for every instance."""

    def __init__(self, settings: ProxySettings, table: InstanceTable) -> None:
        self.settings = settings
        self.table = table
        self.session: aiohttp.ClientSession | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> aiohttp.ClientSession:
        tls = instance_ssl_context(self.settings.instance_tls)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=False,
                                         ssl=tls if tls is not None else True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        return self.session

    async def stop(self) -> None:
        await self.stop_probes()
        if self.session is not None:
            await self.session.close()

    def auth_headers(self, client_auth: str | None) -> dict[str, str]:
        """`--instance-api-key` if set, else the client's own Authorization header (if any)."""
        auth = f"Bearer {self.settings.instance_api_key}" if self.settings.instance_api_key else client_auth
        return {"Authorization": auth} if auth else {}

    def headers(self, request_id: str, client_auth: str | None) -> dict[str, str]:
        """Headers of every call for one client request: the shared X-Request-Id and the credentials."""
        return {"Content-Type": "application/json", "X-Request-Id": request_id, **self.auth_headers(client_auth)}

    async def call(
        self,
        inst: Instance,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout_s: float | None = None,
        method: str = "POST",
    ) -> Buffered | Stream:
        """POST `body` to `inst` (or `method`, e.g. a GET that may stream); a `Stream` (first chunk in
        hand) or a `Buffered` 2xx/4xx response."""
        assert self.session is not None, "start() first"
        lease = self.table.acquire(inst)
        resp: aiohttp.ClientResponse | None = None
        result: Buffered | Stream | None = None
        deadline = math.inf if timeout_s is None else anyio.current_time() + timeout_s
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                lease.scope = scope
                resp = await self.session.request(method, inst.url + path, data=body, headers=headers)
                if resp.status >= 500:
                    detail = (await resp.read())[:300].decode("utf-8", "replace")
                    raise UpstreamFailure(inst, "status", f"HTTP {resp.status}: {detail}", resp.status)
                if resp.status == 200 and resp.content_type == SSE_TYPE:
                    first = await resp.content.readany()
                    if not first:
                        raise UpstreamFailure(inst, "dropped", "the stream ended before its first byte")
                    result = Stream(resp, first, lease, self.table, time.perf_counter())
                else:
                    result = Buffered(resp.status, resp.content_type, await resp.read())
            if scope.cancelled_caught:
                if lease.lost is not None:
                    raise UpstreamFailure(inst, "evicted", lease.lost)
                raise UpstreamFailure(inst, "timeout", f"no response within {timeout_s} s")
        except aiohttp.ClientConnectorError as e:
            self.table.set_health(inst, False, f"unreachable: {e}")
            raise self._failed(UpstreamFailure(inst, "unreachable", str(e))) from None
        except asyncio.TimeoutError:
            raise self._failed(UpstreamFailure(inst, "timeout", "connect timed out")) from None
        except (aiohttp.ClientError, OSError) as e:
            self.suspect(inst)
            raise self._failed(UpstreamFailure(inst, "dropped", f"{type(e).__name__}: {e}")) from None
        except UpstreamFailure as e:
            raise self._failed(e) from None
        finally:
            if not isinstance(result, Stream):  # done, failed or cancelled: the call ends here
                if isinstance(result, Buffered) and resp is not None:
                    resp.release()
                elif resp is not None:
                    resp.close()
                self.table.release(lease)
        assert result is not None
        return result

    @staticmethod
    def _failed(failure: UpstreamFailure) -> UpstreamFailure:
        failure.instance.failures += 1
        log.warning("upstream failure: %s", failure)
        return failure

    def suspect(self, inst: Instance) -> None:
        """A connection to `inst` broke: probe `GET /health` now, so that a dead instance stops being
        picked at once rather than when its heartbeats are missed (a later heartbeat or health check
        re-admits one that is fine)."""
        if inst.healthy and inst.address not in self._probes:
            task = asyncio.ensure_future(self._probe(inst))
            self._probes[inst.address] = task
            task.add_done_callback(lambda _: self._probes.pop(inst.address, None))

    async def _probe(self, inst: Instance) -> None:
        assert self.session is not None
        try:
            async with self.session.get(
                inst.url + "/health", headers=self.auth_headers(None), timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                await r.read()
                reason = None if r.status == 200 else f"GET /health -> HTTP {r.status}"
        except asyncio.TimeoutError:
            return  # slow, maybe busy: heartbeats / health checks decide
        except (aiohttp.ClientError, OSError) as e:
            reason = f"GET /health failed: {type(e).__name__}: {e}"
        if reason is not None:
            self.table.set_health(inst, False, f"after a broken connection, {reason}")

    async def stop_probes(self) -> None:
        for task in list(self._probes.values()):
            task.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)

    async def fetch(
        self, inst: Instance, method: str, path: str, headers: dict[str, str], body: bytes | None = None
    ) -> Buffered:
        """A plain request (GET /v1/models, POST /tokenize, ...), answer buffered; UpstreamFailure
        when unreachable or 5xx."""
        assert self.session is not None, "start() first"
        try:
            async with self.session.request(
                method, inst.url + path, headers=headers, data=body, timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                body = await r.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise UpstreamFailure(inst, "unreachable", f"{type(e).__name__}: {e}") from None
        if r.status >= 500:
            raise UpstreamFailure(inst, "status", f"HTTP {r.status}", r.status)
        return Buffered(r.status, r.content_type, body)
