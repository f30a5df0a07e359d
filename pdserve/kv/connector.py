"""The KV connector: the engine's link to its peer instances (prefill = producer, decode = consumer).

A connector is a role's per-request logic over a `TransferContext` (kv/context.py): the engine id,
sockets, transfer worker, transports and stats that an instance opens once. A single role opens
its own (`KVConnectorBase.open`); a both instance's two halves share one (kv/both.py).

Threads: the engine thread calls every public method here; the notify server thread and the
transfer worker only post events to `self.events`, which the engine thread drains in `poll()`.
So the block pool and the scheduler are only ever touched from the engine thread.

    engine thread ── on_add / begin_step / layer hook / on_request_finished / poll ──┐
    notify thread ── events.put(NotifyMessage) ──────────────────────────────────────┤
    transfer worker (one thread, FIFO) ── transport.read / write_layer ── events.put ┘
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pdserve.config import EngineConfig, KVTransferConfig, ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.request import Request
from pdserve.kv.context import KVTransferStats, TransferContext
from pdserve.kv.messages import KVTransferParams
from pdserve.kv.transports.tcp import TcpServer

_Conn = TypeVar("_Conn", bound="KVConnectorBase")


class _WakingQueue:
    """Events for the engine thread; every put also wakes an idle engine loop (`wake`)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.wake: Callable[[], None] = lambda: None

    def put(self, item: object) -> None:
        self._q.put(item)
        self.wake()

    def get_nowait(self) -> object:
        return self._q.get_nowait()


@dataclass(frozen=True)
class _Done:
    """A transfer-worker result, posted to the engine thread."""

    request_id: str
    ok: bool
    reason: str | None = None
    nbytes: int = 0
    seconds: float = 0.0


class KVConnectorBase:
    """A role's per-request logic over a `TransferContext`, and the event queue it drains."""

    role = "standalone"

    def __init__(self, ctx: TransferContext) -> None:
        self.ctx = ctx
        self.events = _WakingQueue()

    @classmethod
    def open(cls: type[_Conn], config: EngineConfig, model: ModelConfig, cache: KVCache,
             token: str | None = None) -> _Conn:
        """This role's connector over a context of its own, receiving the instance's notify messages."""
        conn = cls(TransferContext.open(config, model, cache, token))
        conn.ctx.on_notify = conn._on_notify
        return conn

    def _on_notify(self, msg: object) -> None:
        """Notify thread: hand the message to the engine thread."""
        self.events.put(msg)

    # ---- the context's identity and servers, as the roles, the server and the registration read them
    @property
    def config(self) -> KVTransferConfig:
        return self.ctx.config

    @property
    def cache(self) -> KVCache:
        return self.ctx.cache

    @property
    def engine_id(self) -> str:
        return self.ctx.engine_id

    @property
    def host(self) -> str:
        return self.ctx.host

    @property
    def stats(self) -> KVTransferStats:
        return self.ctx.stats

    @property
    def tcp_server(self) -> TcpServer:
        return self.ctx.tcp_server

    @property
    def handshake_port(self) -> int:
        return self.ctx.handshake_server.port

    @property
    def notify_port(self) -> int:
        return self.ctx.notify_server.port

    @property
    def transfer_mode(self) -> str:
        return self.config.kv_mode.upper()

    @property
    def http_port(self) -> int | None:
        return self.ctx.http_port

    @http_port.setter
    def http_port(self, value: int | None) -> None:
        """Set by the server once it knows its port."""
        self.ctx.http_port = value

    @property
    def release(self) -> Callable[[Request], None]:
        return self.ctx.release

    @release.setter
    def release(self, value: Callable[[Request], None]) -> None:
        """Set by the engine: frees a request's blocks."""
        self.ctx.release = value

    def _record(self, done: _Done) -> None:
        if done.ok:
            self.stats.bytes_moved += done.nbytes
            self.stats.transfers += 1
            self.stats.transfer_seconds.append(done.seconds)

    # ---- engine-thread interface (overridden per role) -----------------------------------------
    def validate(self, params: KVTransferParams | None, num_prompt_tokens: int) -> None:
        """Raise ValueError (a user-facing message) if `params` cannot be honoured here."""

    def serves(self, request_id: str) -> bool:
        """Whether this connector keeps state under `request_id` (a transfer not yet over)."""
        return False

    def check_request_id(self, request_id: str) -> None:
        """Raise ValueError (a user-facing message) if a new request may not take `request_id` yet:
        this connector still keeps state under it. Called before anything is allocated for it."""
        if self.serves(request_id):
            raise ValueError(f"request id {request_id!r} is still in use by this instance's {self.role} side "
                             "(until its KV transfer ends); send another X-Request-Id")

    def on_add(self, request: Request, params: KVTransferParams | None) -> None:
        """A new request: read its kv_transfer_params before the scheduler sees it."""

    def begin_step(self, prefills: list[tuple[Request, int]]) -> None:
        """Before the forward pass of a step (write mode: which requests push layer by layer)."""

    def on_layer_done(self, layer: int) -> None:
        """During the forward pass, once `layer`'s KV for this step is in the cache."""

    def end_step(self) -> None:
        """After the forward pass."""

    def poll(self) -> tuple[set[str], dict[str, str]]:
        """Drain events; return request ids whose remote KV is ready and those that failed."""
        return set(), {}

    def on_request_finished(self, request: Request) -> bool:
        """True when the connector keeps the request's blocks (it releases them later)."""
        return False

    def close(self) -> None:
        """Close the context: only the connector that opened it (a both instance's halves never do)."""
        self.ctx.close()
