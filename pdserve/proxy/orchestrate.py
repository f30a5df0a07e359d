"""Orchestration of one client request: which instances, in what order, with what bodies, and what
happens when one fails. The result is a `Reply` that nothing has been sent of yet (relay.py sends it).

* standard: the client's body, untouched, to one standalone instance.
* disagg READ (serial): prefill half (`max_tokens=1`, `stream=false`, `do_remote_decode`) -> its
  `kv_transfer_params` -> the client's body plus those params to a decode instance.
* disagg WRITE (concurrent): both halves at once, each carrying the other's KV coordinates; the
  pair is committed once decode's first byte has arrived and the prefill half has answered 200;
  a failure of either half before that aborts the other, and the pair is retried.

A prefill half the proxy gives up on (either mode: the decode half failed or refused the body, the
client went away, the prefill timed out) is also sent the notify `Abort` (docs/protocol.md section 3):
closing its connection stops the request only while it computes, and a prefill that has answered
would hold its KV blocks until the lease ends (30 s).

Failures before anything reached the client are retried once on another instance of the same
role (`max_attempts`); a prefill half that still fails falls back per `--fallback`: the plain
request to the decode instance (`local-prefill`) or a 503 (`fail`). A 4xx is the client's fault:
returned as is, never retried. A completion with `echo: true`, a request with `prompt_logprobs`, a
batch of prompts, one with `truncate_prompt_tokens: -1` or with `use_beam_search` goes as a plain
request to a decode instance by design (prompt logprobs are computed where the prompt is; a KV
transfer is for one prompt; -1 keeps as many prompt tokens as max_tokens leaves room for, and the
prefill half's max_tokens is 1; a beam search sends each beam as a prompt of its own every step,
which the decode's prefix cache serves). A positive `truncate_prompt_tokens` is disaggregated: both halves get it and
keep the same last k tokens. A request with `n > 1` is
disaggregated like any other: the prefill half computes one choice (`n` dropped), and the decode
feeds its other choices from the first one's KV (its prefix cache). A `/v1/responses` request is
disaggregated like chat (its prefill half: `max_output_tokens=1`, `store: false`); one that continues a
stored response (`previous_response_id`) goes whole to the instance that stores it (responses.py). A
background one (`background: true`) is orchestrated as the rest; its decode half answers at once (the
generation goes on there), and in WRITE mode the pair is committed once the prefill half has answered
(not after a grace second: the decode needs all its KV); a decode half of a pair that fails then is
deleted there (when the prefill half fails first, the decode's answer is still awaited, for its id).
Prefill-only work goes whole to a prefill instance (a decode one if no prefill is up), with no KV
moved: `/v1/embeddings`, and a completion or chat request asking for at most one token (a classifier,
an `echo` loglikelihood), which would otherwise prefill on a decode instance or move KV for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import anyio
import zmq

from pdserve.kv.messages import PROXY_ENGINE_ID, Abort
from pdserve.kv.notify import NotifySender
from pdserve.proxy import bodies
from pdserve.proxy.errors import ProxyError, no_instance
from pdserve.proxy.instances import ROLE_NAMES, Instance, InstanceTable, RoleCode
from pdserve.proxy.metrics import ProxyMetrics
from pdserve.proxy.prefix_key import prompt_key
from pdserve.proxy.responses import RESPONSES_PATH, background_id, delete_stored, find_stored, not_stored
from pdserve.proxy.routing import Picker
from pdserve.proxy.settings import BACKGROUND_ANSWER_S, ProxySettings
from pdserve.proxy.upstream import Buffered, Stream, Upstream, UpstreamFailure

log = logging.getLogger(__name__)

Reply = Buffered | Stream
CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"


@dataclass
class ClientRequest:
    """One client request as the orchestrator sees it."""

    path: str  # /v1/completions, /v1/chat/completions or /v1/responses
    raw: bytes  # the client's body
    request_id: str  # X-Request-Id of both halves
    auth: str | None  # the client's Authorization header
    arrival: float  # time.perf_counter()
    first_sent: float | None = None  # when the first upstream request was sent
    key: tuple[bytes, ...] = ()  # the prompt's chunk hashes, for --routing prefix (prefix_key.py)


class _PrefillFailed(Exception):
    def __init__(self, failure: UpstreamFailure) -> None:
        self.failure = failure


class Orchestrator:
    def __init__(
        self,
        settings: ProxySettings,
        table: InstanceTable,
        upstream: Upstream,
        picker: Picker,
        metrics: ProxyMetrics,
    ) -> None:
        self.settings = settings
        self.table = table
        self.upstream = upstream
        self.picker = picker
        self.metrics = metrics
        self._zmq: zmq.Context | None = None  # created on first use (aborts to prefill instances)
        self._notify: NotifySender | None = None
        self._deletes: set[asyncio.Task[None]] = set()  # background responses of failed pairs being deleted

    async def serve(self, req: ClientRequest) -> Reply:
        """The reply to `req`; ProxyError when it cannot be served."""
        if req.path == EMBEDDINGS_PATH:
            return await self._on_prefill(req, "embeddings")
        if self.settings.mode == "standard":
            if self.settings.routing == "prefix" or req.path == RESPONSES_PATH:
                with contextlib.suppress(bodies.BadBody):  # the instance answers a bad body itself
                    body = bodies.parse_body(req.raw)
                    req.key = prompt_key(body, req.path) if self.settings.routing == "prefix" else ()
                    if _continues(req, body):
                        return await self._continuation(req, body, "S")
            return await self._one_of("S", req, req.raw, req.request_id)
        try:
            body = bodies.parse_body(req.raw)
        except bodies.BadBody as e:
            raise ProxyError(400, str(e), code="invalid_json") from None
        if self.settings.routing == "prefix":
            req.key = prompt_key(body, req.path)
        if not self.table.candidates("D"):
            raise no_instance("decode")
        if _continues(req, body):
            return await self._continuation(req, body, "D")
        if bodies.one_token(body, req.path):
            return await self._on_prefill(req, "one_token")
        alone = (
            "echo"
            if body.get("echo") is True
            else "prompt_logprobs"
            if body.get("prompt_logprobs") is not None
            else "batch"
            if bodies.is_batch(body)
            else "truncate_prompt_tokens"
            if bodies.truncates_by_output(body)
            else "beam_search"
            if body.get("use_beam_search") is True
            else None
        )
        if alone is not None:
            # echo, prompt_logprobs: the prompt's logprobs are computed where the prompt is; a batch
            # of prompts: one KV transfer is for one prompt; truncation to what max_tokens leaves
            # room for: the prefill half's max_tokens is 1, so it would keep a longer prompt; a beam
            # search sends every beam as a prompt of its own each step. Either way the decode
            # prefills them itself.
            self.metrics.fallbacks.inc(labels=(alone,))
            return await self._one_of("D", req, bodies.decode_body(body, None), req.request_id)
        if self.settings.kv_mode == "READ":
            return await self._read(req, body)
        return await self._write(req, body)

    async def _on_prefill(self, req: ClientRequest, reason: str) -> Reply:
        """Prefill-only work (`reason`): the body as is to a standalone instance, or in disagg mode
        to a prefill instance (a decode one when no prefill is healthy)."""
        if self.settings.mode == "standard":
            return await self._one_of("S", req, req.raw, req.request_id)
        if self.table.candidates("P"):
            self.metrics.prefill_only.inc(labels=(reason,))
            return await self._one_of("P", req, req.raw, req.request_id)
        if not self.table.candidates("D"):
            raise no_instance("prefill")
        self.metrics.fallbacks.inc(labels=("no_prefill",))
        return await self._one_of("D", req, req.raw, req.request_id)

    # -- pieces ---------------------------------------------------------------------------------

    def _pick(self, role: RoleCode, tried: set[str], key: tuple[bytes, ...] = ()) -> Instance | None:
        return self.picker.pick(role, self.table.candidates(role, tried), key)

    async def _call(
        self, inst: Instance, req: ClientRequest, body: bytes, request_id: str, timeout_s: float | None = None,
        role: RoleCode | None = None,
    ) -> Reply:
        """One upstream call; its failure is counted under `role` (the half it serves; default the
        instance's role)."""
        headers = self.upstream.headers(request_id, req.auth)
        if req.first_sent is None:
            req.first_sent = time.perf_counter()
            self.metrics.request_overhead.observe(req.first_sent - req.arrival)
        try:
            return await self.upstream.call(inst, req.path, body, headers, timeout_s)
        except UpstreamFailure as e:
            self.metrics.upstream_failures.inc(labels=(ROLE_NAMES[role or inst.role], e.kind))
            raise

    async def _one_of(
        self, role: RoleCode, req: ClientRequest, body: bytes, request_id: str, *,
        exclude: frozenset[str] = frozenset(), first: Instance | None = None, avoid: frozenset[str] = frozenset(),
    ) -> Reply:
        """`body` to an instance of `role`, retried on another one while attempts remain. Never one
        in `exclude` (a READ decode half: its own prefill instance); `first`, when still a
        candidate, is tried first; those in `avoid` only when no other is left."""
        tried: set[str] = set(exclude)
        last: UpstreamFailure | None = None
        for attempt in range(self.settings.max_attempts):
            if attempt == 0 and first is not None and first in self.table.candidates(role, tried):
                inst: Instance | None = first
            else:  # S, or D computing the prompt itself
                inst = self._pick(role, tried | avoid, req.key) or self._pick(role, tried, req.key)
            if inst is None:
                break
            tried.add(inst.address)
            if attempt:
                self.metrics.retries.inc(labels=(ROLE_NAMES[role],))
            try:
                return await self._call(inst, req, body, request_id, role=role)
            except UpstreamFailure as e:
                last = e
        if last is None:
            raise no_instance(ROLE_NAMES[role])
        raise ProxyError(502, f"the {ROLE_NAMES[role]} instance failed: {last}", code="upstream_error")

    async def _continuation(self, req: ClientRequest, body: bodies.JSONObject, role: RoleCode) -> Reply:
        """A response that continues a stored one goes whole to the instance that stored it
        (responses.py): in disagg mode that decode prefills it itself."""
        previous = body["previous_response_id"]
        headers = self.upstream.auth_headers(req.auth)
        found = await find_stored(self.upstream, self.table.candidates(role), previous, headers)
        if found is None:
            raise not_stored(previous, ROLE_NAMES[role])
        if role == "D":
            self.metrics.fallbacks.inc(labels=("previous_response",))
        try:
            return await self._call(found[0], req, bodies.decode_body(body, None), req.request_id)
        except UpstreamFailure as e:
            raise ProxyError(
                502, f"the instance that stores the previous response failed: {e}", code="upstream_error"
            ) from None

    async def _same_instance(self, req: ClientRequest, body: bodies.JSONObject, inst: Instance,
                             request_id: str) -> Reply:
        """The prefill and decode picks are one both instance (no other could take either half): it
        gets the plain request and computes the prompt itself, with no KV moved. Not a failure, so
        not a fallback (`--fallback fail` does not apply); counted in pdserve_proxy_same_instance_total."""
        self.metrics.same_instance.inc()
        return await self._one_of("D", req, bodies.decode_body(body, None), request_id, first=inst)

    def _fallback(self, reason: str, failure: UpstreamFailure | None) -> None:
        """Check that a local prefill is allowed (else a 503), and count it."""
        if self.settings.fallback == "fail" and reason != "no_params":
            if failure is None:
                raise no_instance("prefill")
            raise ProxyError(503, f"the prefill instance failed: {failure}", code="prefill_failed")
        self.metrics.fallbacks.inc(labels=(reason,))
        log.info("local prefill on the decode instance (%s)", reason)

    # -- READ -----------------------------------------------------------------------------------

    async def _read(self, req: ClientRequest, body: bodies.JSONObject) -> Reply:
        half = bodies.prefill_body(body, req.path, bodies.prefill_params("READ"))
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        for attempt in range(self.settings.max_attempts):
            decode: Instance | None = None
            if any(i.role == "B" for i in self.table.candidates("P", tried)):
                # A both instance may be picked for either half: the decode first (avoiding the both
                # instances that failed this request's prefill: they may still hold its id), then
                # the prefill among the others. None left: the decode computes it all (same instance).
                decode = self._pick("D", tried) or self._pick("D", set())
            inst = self._pick("P", tried | ({decode.address} if decode else set()), req.key)
            if inst is None:
                if decode is not None and decode.role == "B" and last is None:
                    return await self._same_instance(req, body, decode, req.request_id)
                break
            tried.add(inst.address)
            if attempt:
                self.metrics.retries.inc(labels=("prefill",))
            try:
                reply = await self._call(inst, req, half, req.request_id, self.settings.prefill_timeout_s, role="P")
                if isinstance(reply, Stream):
                    reply.close()
                    raise UpstreamFailure(inst, "status", "streamed a prefill half sent with stream=false")
                if reply.status != 200:
                    return reply  # the client's fault (4xx): as is
                params = bodies.params_from_prefill(reply.body)
            except UpstreamFailure as e:
                last = e
                if e.kind not in _NOTHING_HELD:
                    self._drop_prefill(inst, req.request_id, f"the prefill half failed ({e.kind})")
                continue
            except asyncio.CancelledError:
                self._drop_prefill(inst, req.request_id, "the request was cancelled")
                raise
            except bodies.BadParams as e:
                last = UpstreamFailure(inst, "status", str(e))
                log.warning("prefill instance %s: %s", inst.address, e)
                self._drop_prefill(inst, req.request_id, "unusable kv_transfer_params")
                continue
            if params is None:
                self._fallback("no_params", None)
                return await self._one_of("D", req, bodies.decode_body(body, None), req.request_id,
                                          avoid=frozenset(tried))
            return await self._read_decode(req, body, params, inst, decode)
        self._fallback("prefill_failed" if last else "no_prefill", last)
        # A both instance whose prefill half failed may still hold the id (until our Abort lands), and
        # would refuse it for the plain request (request_id_in_use): the fallback takes an id of its own.
        rid = f"{req.request_id}-local" if tried else req.request_id
        return await self._one_of("D", req, bodies.decode_body(body, None), rid, avoid=frozenset(tried))

    async def _read_decode(self, req: ClientRequest, body: bodies.JSONObject, params: bodies.JSONObject,
                           prefill: Instance | None = None, decode: Instance | None = None) -> Reply:
        """The decode half of a READ request whose prompt's KV a prefill instance now holds. When no
        decode instance will read it (one answered a 4xx: a body the prefill half could not judge, e.g.
        `max_tokens: -1` or `min_tokens` > `max_tokens`, as the proxy set max_tokens=1 there; or none
        is left), the prefill is told to free the blocks now (notify `Abort`) rather than at the end of
        their lease: otherwise every such request pins prefill KV blocks for the lease (30 s)."""
        try:
            # Never the prefill instance itself (a both instance): no self-transfer.
            exclude = frozenset((prefill.address,)) if prefill is not None else frozenset()
            reply = await self._one_of("D", req, bodies.decode_body(body, params), req.request_id,
                                       exclude=exclude, first=decode)
        except ProxyError as e:
            why = "no decode instance" if e.code == "no_instance" else "every decode attempt failed"
            self._release_prefill(req.request_id, params, why)
            raise
        except asyncio.CancelledError:
            self._release_prefill(req.request_id, params, "the request was cancelled")
            raise
        if isinstance(reply, Buffered) and reply.status >= 400:
            self._release_prefill(req.request_id, params, f"the decode instance answered HTTP {reply.status}")
        return reply

    def _release_prefill(self, request_id: str, params: bodies.JSONObject, reason: str) -> None:
        """Send `Abort` to the prefill instance's notify port (docs/protocol.md section 3), when its
        kv_transfer_params name one (pdserve instances do; otherwise the lease frees the blocks)."""
        host, port, engine_id = (params.get(k) for k in ("remote_host", "remote_notify_port", "remote_engine_id"))
        if not (isinstance(host, str) and host and isinstance(port, int) and port > 0 and isinstance(engine_id, str)):
            return
        if self._zmq is None or self._notify is None:
            self._zmq = zmq.Context()
            self._notify = NotifySender(self._zmq, self.settings.registry_token)
        self._notify.send(host, port, Abort(request_id, PROXY_ENGINE_ID, f"dropped by the proxy: {reason}"))
        log.info("request %s: prefill %s:%d told to free its blocks (%s)", request_id, host, port, reason)

    def _drop_prefill(self, prefill: Instance, request_id: str, reason: str) -> None:
        """The proxy gave up on a prefill half that may hold KV blocks for `request_id`, or come to hold
        them: closing its connection aborts the request only while it computes; one that has finished
        (or that a stalled instance computes later) would keep its blocks until the lease ends. So the
        instance is told over its notify port too, when the proxy knows it (registered, or /kv_info)."""
        if prefill.notify_port and prefill.kv_host and prefill.engine_id:
            params = {
                "remote_host": prefill.kv_host,
                "remote_notify_port": prefill.notify_port,
                "remote_engine_id": prefill.engine_id,
            }
            self._release_prefill(request_id, params, reason)

    def _forget_background(self, decode: Instance, reply: Reply | None, req: ClientRequest) -> None:
        """The decode half of a failed pair accepted a background response: delete it there (it would
        wait for KV that never comes), in a task of its own (this request may be being cancelled)."""
        response_id = background_id(reply) if reply is not None else None
        if response_id is None:
            return
        task = asyncio.ensure_future(
            delete_stored(self.upstream, decode, response_id, self.upstream.auth_headers(req.auth))
        )
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)

    def close(self) -> None:
        """Close the notify sockets (at shutdown)."""
        if self._notify is not None:
            self._notify.close()
        if self._zmq is not None:
            self._zmq.term()
        self._zmq = self._notify = None

    # -- WRITE ----------------------------------------------------------------------------------

    async def _write(self, req: ClientRequest, body: bodies.JSONObject) -> Reply:
        tried: dict[RoleCode, set[str]] = {"P": set(), "D": set()}
        last: dict[RoleCode, UpstreamFailure | None] = {"P": None, "D": None}
        failed_role: RoleCode | None = None
        limit = self.settings.max_attempts
        while len(tried["P"]) < limit:
            decode = self._pick("D", tried["D"])
            if decode is None or len(tried["D"]) >= limit:
                if last["D"] is None:
                    raise no_instance("decode")
                raise ProxyError(502, f"the decode instance failed: {last['D']}", code="upstream_error")
            # Never the decode instance itself (a both instance): no self-transfer. None left but the
            # decode, a both instance: it computes the request itself (same instance).
            prefill = self._pick("P", tried["P"] | {decode.address}, req.key)
            if prefill is None:
                if decode.role == "B" and last["P"] is None:
                    rid = req.request_id if not tried["D"] else f"{req.request_id}-local"
                    return await self._same_instance(req, body, decode, rid)
                break
            if failed_role is not None:
                self.metrics.retries.inc(labels=(ROLE_NAMES[failed_role],))
            attempt = len(tried["P"]) + len(tried["D"])
            request_id = req.request_id if attempt == 0 else f"{req.request_id}-{attempt}"
            try:
                return await self._write_pair(req, body, prefill, decode, request_id)
            except _PrefillFailed as e:
                failed_role, last["P"] = "P", e.failure
                tried["P"].add(prefill.address)
            except UpstreamFailure as e:
                failed_role, last["D"] = "D", e
                tried["D"].add(decode.address)
        self._fallback("prefill_failed" if last["P"] else "no_prefill", last["P"])
        plain = bodies.decode_body(body, None)
        return await self._one_of("D", req, plain, f"{req.request_id}-local")

    async def _write_pair(
        self, req: ClientRequest, body: bodies.JSONObject, prefill: Instance, decode: Instance, request_id: str
    ) -> Reply:
        """Both halves at once. The reply is committed once decode's first byte has arrived *and* the
        prefill half has answered 200 (a decode may stream a first chunk, e.g. chat's role, before it
        has the KV); until then a failure of either half aborts the other (its connection is closed)
        and raises _PrefillFailed or UpstreamFailure (decode), which the caller may retry."""
        p_half = bodies.prefill_body(body, req.path, bodies.prefill_params("WRITE", decode))
        d_half = bodies.decode_body(body, bodies.write_decode_params(prefill))
        background = _background(req, body)  # the decode answers at once: only the prefill's answer commits
        p_task = asyncio.ensure_future(
            self._call(prefill, req, p_half, request_id, self.settings.prefill_timeout_s, role="P"))
        decode_scope = anyio.CancelScope()
        loop = asyncio.get_running_loop()

        def on_prefill_done(t: asyncio.Future[Reply]) -> None:
            if t.cancelled() or _prefill_ok(t):
                return
            if background:  # let the decode answer first (at once): its response is then deleted
                loop.call_later(BACKGROUND_ANSWER_S, decode_scope.cancel)
            else:
                decode_scope.cancel()

        p_task.add_done_callback(on_prefill_done)
        reply: Reply | None = None
        try:
            with decode_scope:
                reply = await self._call(decode, req, d_half, request_id, role="D")
            if isinstance(reply, Stream):  # hold decode's first chunk until the prefill half answers
                await asyncio.wait((p_task,))
                reply.first_byte_at = time.perf_counter()  # the hold is protocol, not proxy overhead
            elif reply is not None and reply.status == 200 and not decode_scope.cancel_called:
                await asyncio.wait((p_task,), timeout=None if background else 1.0)  # a complete answer: it is due
        except BaseException as e:  # the decode half failed, or this request was cancelled (client gone)
            p_task.cancel()
            if isinstance(reply, Stream):
                reply.close()
            if background:
                self._forget_background(decode, reply, req)
            if _prefill_may_hold(p_task):
                why = "the decode half failed" if isinstance(e, UpstreamFailure) else "the request was cancelled"
                self._drop_prefill(prefill, request_id, why)
            raise
        if decode_scope.cancel_called or (p_task.done() and not p_task.cancelled() and not _prefill_ok(p_task)):
            # the prefill half failed
            if isinstance(reply, Stream):
                reply.close()
            if background:
                self._forget_background(decode, reply, req)
            if _prefill_may_hold(p_task):  # e.g. timed out: a stalled instance may compute it later
                self._drop_prefill(prefill, request_id, "the prefill half failed")
            return self._prefill_outcome(prefill, p_task)
        p_task.cancel()  # no-op when it answered; a decode 4xx makes it moot
        assert reply is not None
        if isinstance(reply, Buffered) and reply.status >= 400 and _prefill_may_hold(p_task):
            self._drop_prefill(prefill, request_id, f"the decode instance answered HTTP {reply.status}")
        return reply

    @staticmethod
    def _prefill_outcome(prefill: Instance, p_task: asyncio.Future[Reply]) -> Reply:
        """The prefill half failed before the pair was committed: its 4xx (the client's), or _PrefillFailed."""
        exc = p_task.exception()
        if isinstance(exc, UpstreamFailure):
            raise _PrefillFailed(exc)
        if exc is not None:
            raise exc
        reply = p_task.result()
        if isinstance(reply, Buffered) and 400 <= reply.status < 500:
            return reply
        if isinstance(reply, Stream):
            reply.close()
        raise _PrefillFailed(UpstreamFailure(prefill, "status", "the prefill half did not answer 200 with JSON"))


def _background(req: ClientRequest, body: bodies.JSONObject) -> bool:
    """A /v1/responses request that runs in the background."""
    return req.path == RESPONSES_PATH and body.get("background") is True


def _continues(req: ClientRequest, body: bodies.JSONObject) -> bool:
    """A /v1/responses request that continues a stored response."""
    return req.path == RESPONSES_PATH and isinstance(body.get("previous_response_id"), str)


_NOTHING_HELD = ("status", "unreachable")  # prefill failures that show it holds no KV for the request


def _prefill_may_hold(task: asyncio.Future[Reply]) -> bool:
    """Whether a prefill half being given up on may hold KV blocks for its request, or come to: it is
    still running, answered 200, or failed in a way that leaves that open (timeout, dropped, evicted)."""
    if not task.done() or task.cancelled():
        return True
    exc = task.exception()
    if exc is not None:
        return isinstance(exc, UpstreamFailure) and exc.kind not in _NOTHING_HELD
    return _prefill_ok(task)


def _prefill_ok(task: asyncio.Future[Reply]) -> bool:
    """Whether a finished prefill half succeeded (200, JSON)."""
    if task.exception() is not None:
        return False
    reply = task.result()
    return isinstance(reply, Buffered) and reply.status == 200
