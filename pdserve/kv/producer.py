"""The prefill side (kv_producer): compute the prompt, hold its blocks, hand them over.

READ: on finish, answer with the block ids; free them when the decode side says `read_done`
(or when the lease expires). WRITE: the decode side sends `write_dest` (its block ids); during the
forward pass of the prompt's last chunk, each layer's blocks (the whole prompt's, so earlier
chunks go with the last one: the destination is only certain once the request is known to finish
its prompt in this step, and one push per layer keeps the transfer count independent of the
chunking) are queued to the transfer worker as soon as that layer's KV is in the cache, so the
copy overlaps the next layers' compute. Then `write_done` goes to decode and the blocks are freed.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import msgspec

from pdserve.engine.request import Request, RequestStatus
from pdserve.kv.connector import KVConnectorBase, _Done
from pdserve.kv.messages import Abort, KVTransferParams, ReadDone, WriteDest, WriteDone
from pdserve.kv.transports.base import TransferError


@dataclass
class _Held:
    request: Request
    expires: float
    mode: str
    dest: WriteDest | None = None
    pushing: bool = False  # write jobs queued; freed when the worker reports


class KVProducer(KVConnectorBase):
    role = "prefill"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._remote: dict[str, tuple[Request, KVTransferParams]] = {}  # in flight, do_remote_decode
        self._held: dict[str, _Held] = {}  # finished, blocks kept
        self._dests: dict[str, tuple[WriteDest, float]] = {}  # write_dest seen, by request id
        self._step_pushes: list[tuple[Request, WriteDest]] = []
        self._pushed_in_forward: set[str] = set()

    # ---- engine thread ---------------------------------------------------------------------
    def on_add(self, request: Request, params: KVTransferParams | None) -> None:
        if params is None or not params.do_remote_decode:
            return
        # The prefill half computes the prompt and samples exactly one token.
        request.sampling_params = dataclasses.replace(
            request.sampling_params, max_tokens=1, min_tokens=0, stop=(), stop_token_ids=()
        )
        mode = (params.transfer_mode or self.transfer_mode).upper()
        self._remote[request.request_id] = (request, msgspec.structs.replace(params, transfer_mode=mode))
        if mode == "WRITE" and params.remote_host and params.remote_handshake_port:
            self.handshakes.get(params.remote_host, params.remote_handshake_port)  # warm up, in background

    def begin_step(self, prefills: list[tuple[Request, int]]) -> None:
        self._step_pushes = []
        for req, n in prefills:
            entry = self._remote.get(req.request_id)
            dest = self._dests.get(req.request_id)
            if entry is None or dest is None or req.num_computed_tokens + n < req.num_tokens:
                continue
            self._step_pushes.append((req, dest[0]))
            self._pushed_in_forward.add(req.request_id)

    def on_layer_done(self, layer: int) -> None:
        for req, dest in self._step_pushes:
            self._worker.submit(self._push_layers, req.request_id, dest, list(req.block_ids), [layer], False)

    def end_step(self) -> None:
        self._step_pushes = []

    def on_request_finished(self, request: Request) -> bool:
        rid = request.request_id
        entry = self._remote.pop(rid, None)
        if entry is None:
            return False
        _, params = entry
        ok = request.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED)
        pushed = rid in self._pushed_in_forward
        self._pushed_in_forward.discard(rid)
        if not ok:
            if params.transfer_mode == "WRITE" and params.remote_host and params.remote_notify_port:
                self.sender.send(params.remote_host, params.remote_notify_port,
                                 Abort(rid, self.engine_id, f"prefill ended: {request.status.finish_reason}"))
            if pushed:  # the worker may still read these blocks: free when it reports
                self._held[rid] = _Held(request, time.monotonic() + self.config.kv_lease_seconds, "WRITE",
                                        pushing=True)
                return True
            return False
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
        )
        held = _Held(request, time.monotonic() + self.config.kv_lease_seconds, params.transfer_mode or "READ")
        self._held[rid] = held
        self.stats.blocks_held += len(request.block_ids)
        if held.mode == "WRITE":
            dest = self._dests.pop(rid, None)
            if dest is not None:
                self._start_push(held, dest[0], all_layers=not pushed)
        return True

    def _start_push(self, held: _Held, dest: WriteDest, all_layers: bool) -> None:
        """Queue the remaining layers (or just the completion marker) behind any queued layer jobs."""
        held.dest = dest
        held.pushing = True
        layers = list(range(self.cache.layout.num_layers)) if all_layers else []
        self._worker.submit(self._push_layers, held.request.request_id, dest, list(held.request.block_ids),
                            layers, True)

    def poll(self) -> tuple[set[str], dict[str, str]]:
        while True:
            try:
                ev = self.events.get_nowait()
            except Exception:
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
        return set(), {}

    def _handle(self, ev: object) -> None:
        if isinstance(ev, ReadDone):
            if ev.request_id in self._held:
                self._free(ev.request_id)
        elif isinstance(ev, WriteDest):
            held = self._held.get(ev.request_id)
            if held is not None and held.mode == "WRITE" and not held.pushing:
                self._start_push(held, ev, all_layers=True)
            elif held is None:
                self._dests[ev.request_id] = (ev, time.monotonic())
        elif isinstance(ev, Abort):
            self._dests.pop(ev.request_id, None)
            held = self._held.get(ev.request_id)
            if held is not None and not held.pushing:
                self._free(ev.request_id)
        elif isinstance(ev, _Partial):
            self.stats.bytes_moved += ev.nbytes
        elif isinstance(ev, _Done):
            self._record(ev)
            held = self._held.get(ev.request_id)
            if held is None:
                return
            if held.dest is not None:
                self.sender.send(held.dest.handshake_host, held.dest.notify_port,
                                 WriteDone(ev.request_id, self.engine_id, ev.ok, ev.reason))
            self._free(ev.request_id)

    def _free(self, rid: str) -> None:
        held = self._held.pop(rid)
        self.stats.blocks_held -= len(held.request.block_ids)
        self.release(held.request)

    # ---- worker thread -------------------------------------------------------------------------
    def _push_layers(self, rid: str, dest: WriteDest, src: list[int], layers: list[int], final: bool) -> None:
        t0 = time.perf_counter()
        nbytes = 0
        try:
            transport = self._transport(dest.handshake_host, dest.handshake_port)
            n = min(len(src), len(dest.block_ids))
            for layer in layers:
                nbytes += transport.write_layer(layer, src[:n], dest.block_ids[:n])
        except TransferError as e:
            self._drop_transport(dest.handshake_host, dest.handshake_port)
            self.events.put(_Done(rid, False, str(e)))
            return
        if final:
            self.events.put(_Done(rid, True, None, nbytes, time.perf_counter() - t0))
        elif nbytes:
            self.events.put(_Partial(nbytes))


@dataclass(frozen=True)
class _Partial:
    """Bytes pushed by a layer job of a request still computing."""

    nbytes: int
