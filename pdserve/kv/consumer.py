"""The decode side (kv_consumer): receive a prompt's KV, then generate.

A request with `do_remote_prefill` gets blocks for its whole prompt and waits in
WAITING_FOR_REMOTE_KVS. READ: the transfer worker handshakes with the prefill instance (once,
cached), pulls every layer of `remote_block_ids` into our blocks, and sends `read_done`. WRITE: we
send `write_dest` with our block ids and wait for the prefill's `write_done`. On timeout the request
fails or is recomputed locally (`--kv-load-failure-policy`).

In WRITE mode our blocks are granted to the request on our TCP data server from `write_dest` until
the transfer ends (`transports/grants.py`): revoking the grant stops any tcp write into them at
once. A request that ends while a same-host peer may still write into its blocks over shm or
cuda_ipc (which no server of ours sees) keeps them (quarantine) until the transfer settles.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from pdserve.engine.request import Request, RequestStatus
from pdserve.kv.connector import KVConnectorBase, _Done
from pdserve.kv.context import TransferContext
from pdserve.kv.messages import Abort, KVTransferParams, ReadDone, WriteDest, WriteDone
from pdserve.kv.transports.base import TransferError

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request: Request
    params: KVTransferParams
    deadline: float
    started: bool = False
    local_tokens: int = 0  # prompt tokens our prefix cache held when the blocks were allocated
    abandoned: bool = False  # gave up (timeout/recompute) or the request ended: ignore the result
    quarantined: bool = False  # the request ended; its blocks wait for the transfer to settle


class KVConsumer(KVConnectorBase):
    role = "decode"

    def __init__(self, ctx: TransferContext) -> None:
        super().__init__(ctx)
        self.allocate: Callable[[Request], bool] = lambda req: False  # set by the engine
        self._pending: dict[str, _Pending] = {}
        self._last_liveness = 0.0

    # ---- engine thread ---------------------------------------------------------------------
    def validate(self, params: KVTransferParams | None, num_prompt_tokens: int) -> None:
        if params is None or not params.do_remote_prefill:
            return
        mode = (params.transfer_mode or self.transfer_mode).upper()
        if not params.remote_host or not params.remote_handshake_port or not params.remote_notify_port:
            raise ValueError("kv_transfer_params with do_remote_prefill needs remote_host, "
                             "remote_handshake_port and remote_notify_port")
        if mode == "READ" and params.remote_block_ids is None:
            raise ValueError("kv_transfer_params in READ mode needs remote_block_ids")
        if params.num_prompt_tokens is not None and params.num_prompt_tokens != num_prompt_tokens:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens here but {params.num_prompt_tokens} on the "
                "prefill instance (different tokenizer or chat template?)"
            )

    def on_add(self, request: Request, params: KVTransferParams | None) -> None:
        if params is None or not params.do_remote_prefill:
            return
        self.validate(params, request.num_prompt_tokens)
        mode = (params.transfer_mode or self.transfer_mode).upper()
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.stats.decode_halves += 1
        request.kv_transfer_params = None  # consumed here; responses carry none (as vLLM's)
        _set_cached_tokens(request, params.num_cached_tokens or 0)
        params = msgspec.structs.replace(params, transfer_mode=mode)
        self._pending[request.request_id] = _Pending(
            request, params, time.monotonic() + self.config.kv_transfer_timeout
        )

    def _start(self, p: _Pending) -> None:
        """Blocks allocated (the leading `skip` of them from our prefix cache, never written to):
        pull or ask for the KV of the rest."""
        p.started = True
        req, prm = p.request, p.params
        p.local_tokens = req.num_computed_tokens
        skip = p.local_tokens // self.cache.layout.block_size
        if prm.transfer_mode == "READ":
            self.ctx.worker.submit(self._read, req.request_id, prm, list(req.block_ids), skip)
        else:
            self.ctx.handshakes.get(prm.remote_host, prm.remote_handshake_port)  # type: ignore[arg-type]
            self.tcp_server.grants.grant(req.request_id, req.block_ids[skip:])
            self.ctx.sender.send(prm.remote_host, prm.remote_notify_port, WriteDest(  # type: ignore[arg-type]
                req.request_id, self.engine_id, list(req.block_ids), self.host, self.handshake_port,
                self.notify_port, req.num_prompt_tokens, skip_blocks=skip))

    def poll(self) -> tuple[set[str], dict[str, str]]:
        ready: set[str] = set()
        failed: dict[str, str] = {}
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                break
            self._handle(ev, ready, failed)
        now = time.monotonic()
        check = now - self._last_liveness >= 0.1  # a stat() per waiting WRITE request, ten times a second
        if check:
            self._last_liveness = now
        # Blocks go to waiting requests by priority (all 0 under fcfs), then arrival: a stable sort.
        for rid, p in sorted(self._pending.items(), key=lambda item: item[1].request.priority):
            gone = check and self._producer_gone(p)
            if p.quarantined or p.abandoned:
                # Settled once no write can land any more: the peer is gone, or long past the deadline.
                if gone or now > p.deadline + self.config.kv_transfer_timeout:
                    self._settle(rid)
                continue
            if not p.started and self.allocate(p.request):
                self._start(p)
            if gone:
                self._fail(p, "the prefill instance is gone (its KV segment was removed)", failed)
            elif now > p.deadline:
                self._fail(p, f"KV transfer timed out after {self.config.kv_transfer_timeout:g} s", failed)
        return ready, failed

    def _producer_gone(self, p: _Pending) -> bool:
        """A same-host WRITE producer whose shared-memory KV segment has disappeared: it died, and
        cannot write into our blocks any more. Known from the producer's own handshake with us (by
        engine id: right across a restart on the same ports, and without our ever reaching it),
        else from ours with it."""
        prm = p.params
        if prm.transfer_mode != "WRITE" or not p.started:
            return False
        peer = self.ctx.handshake_server.peers.get(prm.remote_engine_id or "")
        if peer is not None:
            host, segment = peer.hostname, peer.shm_segment
        else:
            fut = self.ctx.handshakes.get(prm.remote_host, prm.remote_handshake_port)  # type: ignore[arg-type]
            if not fut.done() or fut.exception() is not None or fut.result().transports.shm is None:
                return False
            shm = fut.result().transports.shm
            host, segment = shm.hostname, shm.segment
        return bool(segment) and host == self.ctx.hostname and not os.path.exists(
            f"/dev/shm/{segment.lstrip('/')}"  # type: ignore[union-attr]
        )

    def _handle(self, ev: object, ready: set[str], failed: dict[str, str]) -> None:
        if isinstance(ev, _Done | WriteDone):
            p = self._pending.get(ev.request_id)
            if p is None:
                return
            if isinstance(ev, _Done):
                self._record(ev)
            if p.quarantined or p.abandoned:
                self._settle(ev.request_id)
            elif ev.ok:
                self._drop(ev.request_id)
                ready.add(ev.request_id)
                if isinstance(ev, WriteDone):
                    _set_cached_tokens(p.request, ev.num_cached_tokens)
            else:
                self._fail(p, f"KV transfer failed: {ev.reason}", failed)
                if not p.quarantined:
                    self._drop(ev.request_id)
        elif isinstance(ev, Abort):
            p = self._pending.get(ev.request_id)
            if p is not None and not (p.quarantined or p.abandoned):
                self._fail(p, f"the prefill instance aborted the request: {ev.reason}", failed)
                self._drop(ev.request_id)
        # ReadDone / WriteDest are addressed to producers: ignored here.

    def _fail(self, p: _Pending, reason: str, failed: dict[str, str]) -> None:
        self.stats.load_failures += 1
        rid = p.request.request_id
        prm = p.params
        self.tcp_server.grants.revoke(rid)  # no tcp write lands after this, in a recompute either
        self.ctx.sender.send(prm.remote_host, prm.remote_notify_port, Abort(rid, self.engine_id, reason))  # type: ignore[arg-type]
        if self.config.kv_load_failure_policy == "recompute":
            p.abandoned = True  # a late result is ignored; the blocks stay with the request
            p.request.num_computed_tokens = p.local_tokens  # our cached prefix is still good
            p.request.status = RequestStatus.WAITING
            if not p.started:
                self._drop(rid)
        else:
            failed[rid] = reason  # the scheduler finishes it; on_request_finished decides on the blocks

    def _drop(self, rid: str) -> _Pending | None:
        """Forget a pending request; its tcp grant goes with it (no late write lands afterwards)."""
        self.tcp_server.grants.revoke(rid)
        return self._pending.pop(rid, None)

    def _settle(self, rid: str) -> None:
        p = self._drop(rid)
        if p is not None and p.quarantined:
            log.info("request %s: transfer settled, %d blocks freed", rid, len(p.request.block_ids))
            self.release(p.request)

    def serves(self, request_id: str) -> bool:
        """Whether the request is one of ours: waiting for (or receiving) its remote KV."""
        return request_id in self._pending

    def on_request_finished(self, request: Request) -> bool:
        p = self._pending.get(request.request_id)
        if p is None:
            return False
        prm = p.params
        if p.started and prm.transfer_mode == "WRITE" and prm.remote_engine_id is not None \
                and prm.remote_engine_id not in self.ctx.handshake_server.peers:
            # The producer never handshaked with us: it cannot know our segment, so cannot write.
            self.ctx.sender.send(prm.remote_host, prm.remote_notify_port,  # type: ignore[arg-type]
                             Abort(request.request_id, self.engine_id, "decode request ended"))
            self._drop(request.request_id)
            return False
        if p.started and not p.abandoned:
            self.ctx.sender.send(prm.remote_host, prm.remote_notify_port,  # type: ignore[arg-type]
                             Abort(request.request_id, self.engine_id, "decode request ended"))
        if p.started:
            if self._fenced(p):
                self._drop(request.request_id)
                return False
            # A transfer may still write into these blocks: keep them until it settles.
            p.quarantined = True
            log.info("request %s ended during its KV transfer: its %d blocks wait for the transfer to settle",
                     request.request_id, len(request.block_ids))
            return True
        self._drop(request.request_id)
        if not p.started and not p.abandoned:
            # Ended before it had blocks (so before write_dest / the read): nothing can land in ours,
            # but the prefill may hold the prompt's blocks for us until its lease ends.
            abort = Abort(request.request_id, self.engine_id, "decode request ended")
            self.ctx.sender.send(prm.remote_host, prm.remote_notify_port, abort)  # type: ignore[arg-type]
        return False

    def _fenced(self, p: _Pending) -> bool:
        """True when nothing can write into the request's blocks any more: a WRITE whose producer
        is on another host (it said so in its handshake with us) can reach them only over tcp
        (the context refuses shm/cuda_ipc across hostnames: kv/context.py), and revoking the grant ends that."""
        prm = p.params
        if prm.transfer_mode != "WRITE" or prm.remote_engine_id is None:
            return False  # READ: our own worker may still be copying into the blocks
        if self.ctx.nixl is not None:
            return False  # a peer of any host may write into our NIXL-registered cache: no grant stops it
        peer = self.ctx.handshake_server.peers.get(prm.remote_engine_id)
        return peer is not None and peer.hostname != self.ctx.hostname \
            and self.tcp_server.grants.revoke(p.request.request_id)

    # ---- worker thread -------------------------------------------------------------------------
    def _read(self, rid: str, prm: KVTransferParams, dst: list[int], skip: int) -> None:
        """Pull the prompt's blocks after the first `skip` (those our prefix cache holds)."""
        t0 = time.perf_counter()
        host, port = prm.remote_host, prm.remote_handshake_port
        try:
            transport = self.ctx.transport(host, port)  # type: ignore[arg-type]
            src = prm.remote_block_ids or []
            if len(src) != len(dst):
                raise TransferError(f"the prefill holds {len(src)} blocks for this prompt, we allocated {len(dst)}")
            nbytes = transport.read(src[skip:], dst[skip:], request_id=rid)
        except TransferError as e:
            self.ctx.drop_transport(host, port)  # type: ignore[arg-type]
            self.events.put(_Done(rid, False, str(e)))
            return
        self.ctx.sender.send(host, prm.remote_notify_port, ReadDone(rid, self.engine_id))  # type: ignore[arg-type]
        self.events.put(_Done(rid, True, None, nbytes, time.perf_counter() - t0))


def _set_cached_tokens(request: Request, n: int) -> None:
    """The prefill's count of prompt tokens from its prefix cache (for usage), kept in range."""
    request.num_cached_tokens = min(max(n, 0), request.num_prompt_tokens)
