"""The prefill side (kv_producer): compute the prompt, hold its blocks, hand them over.

READ: on finish, answer with the block ids; free them when the decode side says `read_done`
(or when the lease expires). WRITE: the decode side sends `write_dest` (its block ids); during the
forward pass of the prompt's last chunk, each layer's blocks (the whole prompt's, so earlier
chunks go with the last one: the destination is only certain once the request is known to finish
its prompt in this step, and one push per layer keeps the transfer count independent of the
chunking) are queued to the transfer worker as soon as that layer's KV is in the cache, so the
copy overlaps the next layers' compute. Then `write_done` goes to decode and the blocks are freed.

`abort` (from the decode instance, or from the proxy when it drops this half) frees held blocks
at once, or once the worker has stopped reading them. An abort from the proxy can overtake the
request it names (the HTTP call and the notify message travel apart): it is remembered for a few
seconds, and a request that arrives meanwhile is treated as aborted, so its blocks are not held.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from dataclasses import dataclass

import msgspec

from pdserve.engine.request import Request, RequestStatus
from pdserve.kv.connector import KVConnectorBase, _Done
from pdserve.kv.context import TransferContext
from pdserve.kv.messages import PROXY_ENGINE_ID, Abort, KVTransferParams, ReadDone, WriteDest, WriteDone
from pdserve.kv.transports.base import TransferError

EARLY_ABORT_SECONDS = 10.0  # how long an abort from the proxy waits for the request it names


@dataclass
class _Held:
    request: Request
    expires: float
    mode: str
    dest: WriteDest | None = None
    pushing: bool = False  # write jobs queued; freed when the worker reports


class KVProducer(KVConnectorBase):
    role = "prefill"

    def __init__(self, ctx: TransferContext) -> None:
        super().__init__(ctx)
        self._remote: dict[str, tuple[Request, KVTransferParams]] = {}  # in flight, do_remote_decode
        self._held: dict[str, _Held] = {}  # finished, blocks kept
        self._dests: dict[str, tuple[WriteDest, float]] = {}  # write_dest seen, by request id
        self._step_pushes: list[tuple[Request, WriteDest]] = []
        self._forward_push: set[str] = set()  # requests whose layers were queued during a forward pass
        self._push_results: dict[str, _Done] = {}  # forward pushes that completed before the request ended
        self._push_failed: set[str] = set()  # worker thread only: skip the rest of a failed push
        self._cancelled: set[str] = set()  # decode aborted: set by the notify thread, read by the worker
        self._peer_aborted: set[str] = set()  # decode aborted while this request still computes
        self._early_aborts: dict[str, float] = {}  # the proxy's aborts of requests not seen yet, by arrival

    # ---- engine thread ---------------------------------------------------------------------
    def on_add(self, request: Request, params: KVTransferParams | None) -> None:
        if params is None or not params.do_remote_decode:
            return
        # The prefill half computes the prompt and samples exactly one token.
        request.sampling_params = dataclasses.replace(
            request.sampling_params, max_tokens=1, min_tokens=0, stop=(), stop_token_ids=()
        )
        mode = (params.transfer_mode or self.transfer_mode).upper()
        self.stats.prefill_halves += 1
        self._remote[request.request_id] = (request, msgspec.structs.replace(params, transfer_mode=mode))
        if self._early_aborts.pop(request.request_id, None) is not None:  # the proxy gave up on it already
            self._handle(Abort(request.request_id, PROXY_ENGINE_ID, "aborted before it arrived"))
        elif mode == "WRITE" and params.remote_host and params.remote_handshake_port:
            self.ctx.handshakes.get(params.remote_host, params.remote_handshake_port)  # warm up, in background

    def _on_notify(self, msg: object) -> None:
        if isinstance(msg, Abort):  # let the worker stop at the next layer, before the engine sees it
            self._cancelled.add(msg.request_id)
        super()._on_notify(msg)

    def begin_step(self, prefills: list[tuple[Request, int]]) -> None:
        self._step_pushes = []
        for req, n in prefills:
            dest = self._dests.get(req.request_id)
            if (
                req.request_id not in self._remote
                or dest is None
                or req.num_computed_tokens + n < req.num_tokens
                or req.request_id in self._peer_aborted
            ):
                continue
            self._step_pushes.append((req, dest[0]))
            self._forward_push.add(req.request_id)

    def on_layer_done(self, layer: int) -> None:
        final = layer == self.cache.layout.num_layers - 1
        for req, dest in self._step_pushes:
            self.ctx.worker.submit(self._push_layers, req.request_id, dest, list(req.block_ids), [layer], final,
                                req.num_cached_tokens)

    def end_step(self) -> None:
        self._step_pushes = []

    def serves(self, request_id: str) -> bool:
        """Whether the request is one of ours: computing (do_remote_decode) or holding its blocks."""
        return request_id in self._remote or request_id in self._held

    def on_request_finished(self, request: Request) -> bool:
        rid = request.request_id
        entry = self._remote.pop(rid, None)
        if entry is None:
            return False
        _, params = entry
        pushed = rid in self._forward_push
        self._forward_push.discard(rid)
        pushed_done = self._push_results.pop(rid, None) is not None
        if rid in self._peer_aborted:  # nobody will read these blocks
            self._peer_aborted.discard(rid)
            request.kv_transfer_params = None  # the answer offers no KV (a proxy would prefill locally)
            dest = self._dests.pop(rid, None)  # a write_dest that came after the abort: nothing was pushed
            if dest is not None:
                self.ctx.worker.submit(self._ack_abort, rid, dest[0], "aborted")
            return self._hold_while_pushing(request) if pushed and not pushed_done else False
        if request.status not in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED):
            reason = f"prefill ended: {request.status.finish_reason}"
            dest = self._dests.pop(rid, None)
            if dest is not None:
                # Decode sent write_dest, so it may have ended too and be keeping its blocks until we
                # settle the transfer: only write_done does that (an abort from us does not, since
                # it could overtake pushes). Layers may still be on their way: tell it behind them.
                if pushed and not pushed_done:
                    self._cancelled.add(rid)
                self.ctx.worker.submit(self._ack_abort, rid, dest[0], reason)
            elif params.transfer_mode == "WRITE" and params.remote_host and params.remote_notify_port:
                self.ctx.sender.send(params.remote_host, params.remote_notify_port, Abort(rid, self.engine_id, reason))
            return self._hold_while_pushing(request) if pushed and not pushed_done else False
        request.kv_transfer_params = KVTransferParams(
            do_remote_prefill=True,
            remote_engine_id=self.engine_id,
            remote_block_ids=list(request.block_ids),
            remote_host=self.host,
            remote_port=self.http_port,
            remote_handshake_port=self.handshake_port,
            remote_notify_port=self.notify_port,
            transfer_mode=params.transfer_mode,
            num_prompt_tokens=request.num_prompt_tokens,
            lease_seconds=self.config.kv_lease_seconds,
            num_cached_tokens=request.num_cached_tokens,
        )
        if params.transfer_mode != "WRITE":
            self._hold(request, "READ")
            return True
        if pushed:  # every layer went out during the forward pass; decode was told by the worker
            return self._hold_while_pushing(request) if not pushed_done else False
        held = self._hold(request, "WRITE")
        dest = self._dests.pop(rid, None)
        if dest is not None:
            self._start_push(held, dest[0])
        return True

    def _hold(self, request: Request, mode: str) -> _Held:
        held = _Held(request, time.monotonic() + self.config.kv_lease_seconds, mode)
        self._held[request.request_id] = held
        if mode == "READ":  # the decode may now read these blocks over tcp, until _free
            self.tcp_server.grants.grant(request.request_id, request.block_ids)
        self.stats.blocks_held += len(request.block_ids)
        return held

    def _hold_while_pushing(self, request: Request) -> bool:
        """Keep the blocks until the worker reports: it may still be reading them."""
        self._hold(request, "WRITE").pushing = True
        return True

    def _start_push(self, held: _Held, dest: WriteDest) -> None:
        """Push every layer of a finished request (write_dest came after its prompt was computed)."""
        held.dest = dest
        held.pushing = True
        layers = list(range(self.cache.layout.num_layers))
        req = held.request
        self.ctx.worker.submit(self._push_layers, req.request_id, dest, list(req.block_ids), layers, True,
                            req.num_cached_tokens)

    def poll(self) -> tuple[set[str], dict[str, str]]:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                break
            self._handle(ev)
        now = time.monotonic()
        for rid, h in list(self._held.items()):
            if now > h.expires and not h.pushing:
                self.stats.lease_expiries += 1
                self._free(rid)
            elif now > h.expires + self.config.kv_transfer_timeout:  # a push that never reported
                self.stats.lease_expiries += 1
                self._free(rid)
        for rid, (_, t) in list(self._dests.items()):
            if now - t > self.config.kv_lease_seconds:
                del self._dests[rid]
        for rid, t in list(self._early_aborts.items()):
            if now - t > EARLY_ABORT_SECONDS:
                del self._early_aborts[rid]
        return set(), {}

    def _handle(self, ev: object) -> None:
        if isinstance(ev, ReadDone):
            if ev.request_id in self._held:
                self._free(ev.request_id)
        elif isinstance(ev, WriteDest):
            held = self._held.get(ev.request_id)
            if held is not None and held.mode == "WRITE" and not held.pushing:
                self._start_push(held, ev)
            elif held is None:
                self._dests[ev.request_id] = (ev, time.monotonic())
        elif isinstance(ev, Abort):
            rid = ev.request_id
            held = self._held.get(rid)
            dest = self._dests.pop(rid, None)
            dest_msg = dest[0] if dest is not None else (held.dest if held is not None else None)
            if dest_msg is not None:
                # Behind any queued pushes for it: once this runs, nothing more is written for rid,
                # and decode may reuse the blocks it was holding for us.
                who = "the proxy" if ev.engine_id == PROXY_ENGINE_ID else "the decode instance"
                self.ctx.worker.submit(self._ack_abort, rid, dest_msg, f"aborted by {who}")
            else:  # no push for rid was queued, nor can be: do not let the mark stop a later one
                self._cancelled.discard(rid)
            if held is not None and not held.pushing:
                self._free(rid)
            elif rid in self._remote:
                self._peer_aborted.add(rid)
            elif held is None and ev.engine_id == PROXY_ENGINE_ID:  # it may overtake its request
                self._early_aborts[rid] = time.monotonic()
        elif isinstance(ev, _Partial):
            self.stats.bytes_moved += ev.nbytes
        elif isinstance(ev, _Done):
            self._record(ev)
            if ev.request_id in self._held:
                self._free(ev.request_id)
            elif ev.request_id in self._remote:  # pushed during the forward pass; still computing
                self._push_results[ev.request_id] = ev

    def _free(self, rid: str) -> None:
        held = self._held[rid]
        if held.mode == "READ" and not self.tcp_server.grants.revoke(rid):
            held.expires = time.monotonic() + 1.0  # a read of these blocks did not stop: not yet
            return
        del self._held[rid]
        self.stats.blocks_held -= len(held.request.block_ids)
        self.release(held.request)

    # ---- worker thread -------------------------------------------------------------------------
    def _ack_abort(self, rid: str, dest: WriteDest, reason: str) -> None:
        """Worker: every push queued for rid has run (or stopped); tell decode it may free its blocks."""
        self._cancelled.discard(rid)
        self.ctx.sender.send(dest.handshake_host, dest.notify_port, WriteDone(rid, self.engine_id, False, reason))

    def _push_layers(
        self, rid: str, dest: WriteDest, src: list[int], layers: list[int], final: bool, cached: int
    ) -> None:
        """Write `layers` of `src` into decode's blocks. The final job tells decode directly (it need
        not wait for the rest of this step's compute; `cached`: the prompt tokens found in our prefix
        cache, for its usage) and reports to the engine thread."""
        if rid in self._push_failed:  # an earlier layer failed; decode and the engine know already
            if final:
                self._push_failed.discard(rid)
            return
        t0 = time.perf_counter()
        nbytes = 0
        try:
            transport = self.ctx.transport(dest.handshake_host, dest.handshake_port)
            n = min(len(src), len(dest.block_ids))
            skip = min(max(dest.skip_blocks, 0), n)  # decode's own cached prefix: not ours to write
            for layer in layers:
                if rid in self._cancelled:
                    self.events.put(_Done(rid, False, "aborted"))
                    return
                if skip < n:
                    nbytes += transport.write_layer(layer, src[skip:n], dest.block_ids[skip:n], request_id=rid)
        except TransferError as e:
            self.ctx.drop_transport(dest.handshake_host, dest.handshake_port)
            if not final:
                self._push_failed.add(rid)
            self.ctx.sender.send(dest.handshake_host, dest.notify_port, WriteDone(rid, self.engine_id, False, str(e)))
            self.events.put(_Done(rid, False, str(e)))
            return
        if final:
            self.ctx.sender.send(dest.handshake_host, dest.notify_port,
                             WriteDone(rid, self.engine_id, True, num_cached_tokens=cached))
            self.events.put(_Done(rid, True, None, nbytes, time.perf_counter() - t0))
        elif nbytes:
            self.events.put(_Partial(nbytes))


@dataclass(frozen=True)
class _Partial:
    """Bytes pushed by a layer job of a request still computing."""

    nbytes: int
