"""The both role (vLLM's `kv_role: kv_both`): per request, the prefill half, the decode half, or neither.

A request's `kv_transfer_params` decide: `do_remote_decode` makes this instance the prefill half
(the producer's logic, kv/producer.py), `do_remote_prefill` the decode half (the consumer's,
kv/consumer.py), none a plain request computed here. READ or WRITE is the request's
`transfer_mode` (the instance's `--kv-mode` when absent), as for the single roles, so one `both`
instance serves either mode.

The two halves are built over one `TransferContext` (kv/context.py), which this connector opens:
one engine id, one handshake server, one notify socket, one TCP data server, one NIXL agent, one
transfer worker, one set of stats. Each half keeps its own per-request state and its own event
queue (whose puts wake the engine loop); this class routes to them. Invariants:

* Notify messages go by type: `read_done` and `write_dest` are a producer's, `write_done` a
  consumer's. An `abort` from a peer engine may be for either half, so both get it: each ignores an
  abort of a request it does not know, exactly as a single-role instance does. The proxy's aborts
  (`engine_id: "proxy"`) are only ever for a prefill half, so only the producer gets them (it
  remembers one that overtakes its request).
* Worker results come back on the queue of the half whose job it was (each half's own `events`).
* A request id is known to at most one half at a time, and a plain request never takes one that a
  half still knows (`check_request_id`, which the engine calls before it allocates anything): TCP
  grants, held and quarantined blocks, notify messages and `on_request_finished` go by request id.
* A request that names this instance as its own peer is refused: a proxy sends such a request
  plain (docs/protocol.md section 5).
"""

from __future__ import annotations

from collections.abc import Callable

from pdserve.engine.request import Request
from pdserve.kv.connector import KVConnectorBase
from pdserve.kv.consumer import KVConsumer
from pdserve.kv.context import TransferContext
from pdserve.kv.messages import PROXY_ENGINE_ID, Abort, KVTransferParams, ReadDone, WriteDest, WriteDone
from pdserve.kv.producer import KVProducer


class KVBoth(KVConnectorBase):
    """Producer and consumer over one context; dispatches each request to one of them."""

    role = "both"

    def __init__(self, ctx: TransferContext) -> None:
        super().__init__(ctx)
        self.producer = KVProducer(ctx)
        self.consumer = KVConsumer(ctx)
        for half in (self.producer, self.consumer):
            half.events.wake = lambda: self.events.wake()  # late-bound: the engine sets ours after this

    @property
    def allocate(self) -> Callable[[Request], bool]:
        """The scheduler's `allocate_for_remote`, for the decode half."""
        return self.consumer.allocate

    @allocate.setter
    def allocate(self, value: Callable[[Request], bool]) -> None:
        self.consumer.allocate = value

    # ---- notify thread -------------------------------------------------------------------------
    def _on_notify(self, msg: object) -> None:
        if isinstance(msg, ReadDone | WriteDest):
            self.producer._on_notify(msg)
        elif isinstance(msg, WriteDone):
            self.consumer._on_notify(msg)
        elif isinstance(msg, Abort):
            self.producer._on_notify(msg)
            if msg.engine_id != PROXY_ENGINE_ID:
                self.consumer._on_notify(msg)

    # ---- engine thread -------------------------------------------------------------------------
    def validate(self, params: KVTransferParams | None, num_prompt_tokens: int) -> None:
        if params is None:
            return
        if params.do_remote_decode and params.do_remote_prefill:
            raise ValueError("kv_transfer_params cannot set both do_remote_decode and do_remote_prefill: "
                             "a request is the prefill half or the decode half")
        if (params.do_remote_decode or params.do_remote_prefill) and params.remote_engine_id == self.engine_id:
            raise ValueError("kv_transfer_params name this instance as its own peer: send the request without "
                             "them (it is then computed here)")
        self.consumer.validate(params, num_prompt_tokens)
        self.producer.validate(params, num_prompt_tokens)

    def on_add(self, request: Request, params: KVTransferParams | None) -> None:
        if params is None or not (params.do_remote_decode or params.do_remote_prefill):
            return
        self.validate(params, request.num_prompt_tokens)
        if params.do_remote_decode:
            self.producer.on_add(request, params)
        else:
            self.consumer.on_add(request, params)

    def serves(self, request_id: str) -> bool:
        # Not the producer's write_dest table: a decode's write_dest may come before the prefill half it is for.
        return self.producer.serves(request_id) or self.consumer.serves(request_id)

    def check_request_id(self, request_id: str) -> None:
        self.producer.check_request_id(request_id)
        self.consumer.check_request_id(request_id)

    def begin_step(self, prefills: list[tuple[Request, int]]) -> None:
        self.producer.begin_step(prefills)  # only its own do_remote_decode requests push

    def on_layer_done(self, layer: int) -> None:
        self.producer.on_layer_done(layer)

    def end_step(self) -> None:
        self.producer.end_step()

    def poll(self) -> tuple[set[str], dict[str, str]]:
        self.producer.poll()  # frees, lease expiries, pushes started: it reports no requests
        return self.consumer.poll()

    def on_request_finished(self, request: Request) -> bool:
        if self.producer.serves(request.request_id):
            return self.producer.on_request_finished(request)
        return self.consumer.on_request_finished(request)
