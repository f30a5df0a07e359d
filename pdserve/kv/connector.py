"""The KV connector: the engine's link to its peer instances (prefill = producer, decode = consumer).

Threads: the engine thread calls every public method here; the notify server thread and the
transfer worker only post events to `self.events`, which the engine thread drains in `poll()`.
So the block pool and the scheduler are only ever touched from the engine thread.

    engine thread ── on_add / begin_step / layer hook / on_request_finished / poll ──┐
    notify thread ── events.put(NotifyMessage) ──────────────────────────────────────┤
    transfer worker (one thread, FIFO) ── transport.read / write_layer ── events.put ┘
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import zmq

from pdserve.config import EngineConfig, ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.request import Request
from pdserve.kv.handshake import HandshakeClient, HandshakeServer, fingerprint, layout_info
from pdserve.kv.messages import (
    PROTOCOL_VERSION,
    HandshakeReply,
    HandshakeRequest,
    KVTransferParams,
    ShmDescriptor,
    TcpDescriptor,
    Transports,
)
from pdserve.kv.notify import NotifySender, NotifyServer
from pdserve.kv.transports.base import KVTransport, TransferError
from pdserve.kv.transports.shm import ShmTransport
from pdserve.kv.transports.tcp import TcpServer, TcpTransport

if TYPE_CHECKING:
    from pdserve.kv.transports.nixl import NixlAgent

log = logging.getLogger(__name__)
_Half = TypeVar("_Half", bound="KVConnectorBase")


@dataclass
class KVTransferStats:
    bytes_moved: int = 0
    transfers: int = 0
    transfer_seconds: list[float] = field(default_factory=list)  # drained by the metrics exporter
    lease_expiries: int = 0
    load_failures: int = 0
    handshake_failures: int = 0
    blocks_held: int = 0
    prefill_halves: int = 0  # requests served as the prefill half (do_remote_decode), lifetime
    decode_halves: int = 0  # requests served as the decode half (do_remote_prefill), lifetime


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
    """Sockets, handshake, transports and the event queue shared by both roles."""

    role = "standalone"

    def __init__(self, config: EngineConfig, model: ModelConfig, cache: KVCache, token: str | None = None) -> None:
        kt = config.kv_transfer
        self.config = kt
        self.cache = cache
        self.token = token
        self.engine_id = uuid.uuid4().hex[:16]
        self.host = kt.kv_host
        self.http_port: int | None = None  # set by the server once it knows its port
        self.hostname = socket.gethostname()  # what peers compare theirs with (shm, cuda_ipc: same host only)
        self.stats = KVTransferStats()
        self.events = _WakingQueue()
        self.release: Callable[[Request], None] = lambda req: None  # set by the engine: frees blocks
        self._ctx = zmq.Context()
        self.fingerprint = fingerprint(model, cache.layout)
        self.tcp_server = TcpServer(cache.tensor, self.host, token)
        transports = Transports(tcp=TcpDescriptor(self.host, self.tcp_server.port), hostname=self.hostname)
        if cache.tensor.is_cuda:
            from pdserve.kv.transports.cuda_ipc import export_cache

            transports.cuda_ipc = export_cache(cache.tensor)
        if cache.shm_name is not None:
            transports.shm = ShmDescriptor(cache.shm_name, cache.layout.total_bytes, self.hostname)
        self.nixl: NixlAgent | None = None  # only with --kv-transport nixl (importing nixl loads UCX)
        if kt.kv_transport == "nixl":
            from pdserve.kv.transports.nixl import NixlAgent

            self.nixl = NixlAgent(self.engine_id, cache.tensor, self.host)
            transports.nixl = self.nixl.descriptor()
        reply = HandshakeReply(PROTOCOL_VERSION, self.engine_id, self.fingerprint, layout_info(cache.layout),
                               transports)
        self.handshake_server = HandshakeServer(self._ctx, self.host, kt.kv_handshake_port, reply, token)
        self.notify_server = NotifyServer(self._ctx, self.host, kt.kv_notify_port, self._on_notify, token)
        self.sender = NotifySender(self._ctx, token)
        self.handshakes = HandshakeClient(
            self._ctx, HandshakeRequest(PROTOCOL_VERSION, self.engine_id, self.fingerprint, token, self.hostname,
                                        cache.shm_name, reply.layout.dtype, reply.layout.kv_scales)
        )
        self._transports: dict[tuple[str, int], KVTransport] = {}  # used by the worker thread only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-kv-transfer")
        self._lock = threading.Lock()
        self._init_role()

    def _init_role(self) -> None:
        """The role's own state (a subclass's), after the shared sockets and transports exist."""

    @classmethod
    def half_of(cls: type[_Half], owner: KVConnectorBase) -> _Half:
        """This role's logic over `owner`'s engine id, sockets, tcp server, NIXL agent, handshake
        cache, transfer worker and stats, opening nothing of its own (the both role, kv/both.py).
        It gets its own event queue, whose every put wakes the owner's engine loop: the owner
        routes notify messages to its halves, and each half drains its own queue in `poll()`.
        `http_port` and `release` are copied: the owner passes later changes on."""
        half = cls.__new__(cls)
        half.__dict__.update({k: v for k, v in vars(owner).items()
                              if k != "events" and not isinstance(v, KVConnectorBase)})
        half.http_port, half.release = owner.http_port, owner.release
        half.events = _WakingQueue()
        half.events.wake = lambda: owner.events.wake()  # late-bound: the engine sets the owner's wake
        half._init_role()
        return half

    def _on_notify(self, msg: object) -> None:
        """Notify thread: hand the message to the engine thread."""
        self.events.put(msg)

    @property
    def handshake_port(self) -> int:
        return self.handshake_server.port

    @property
    def notify_port(self) -> int:
        return self.notify_server.port

    @property
    def transfer_mode(self) -> str:
        return self.config.kv_mode.upper()

    # ---- worker-thread helpers -----------------------------------------------------------------
    def _transport(self, host: str, handshake_port: int) -> KVTransport:
        """Handshake (cached) and open the transport to a peer. Worker thread only."""
        key = (host, handshake_port)
        t = self._transports.get(key)
        if t is not None:
            return t
        try:
            reply = self.handshakes.get(host, handshake_port).result(timeout=self.config.kv_transfer_timeout)
        except Exception as e:
            self.stats.handshake_failures += 1
            self.handshakes.forget(host, handshake_port)
            raise TransferError(f"handshake with {host}:{handshake_port} failed: {e}") from None
        t = self._open(reply)
        self._transports[key] = t
        return t

    def _open(self, reply: HandshakeReply) -> KVTransport:
        """Pick the transport: --kv-transport, or auto: same host -> cuda_ipc (GPU) / shm (CPU), else tcp."""
        choice = self.config.kv_transport
        offered = reply.transports
        same_host = offered.hostname == self.hostname
        shape = self.cache.layout.shape[:1] + (reply.layout.num_blocks,) + self.cache.layout.shape[2:]
        on_gpu = self.cache.tensor.is_cuda
        if choice == "nixl":
            if self.nixl is None or offered.nixl is None:
                raise TransferError("the peer offers no NIXL transport: start both instances with --kv-transport nixl")
            from pdserve.kv.transports.nixl import NixlTransport

            return NixlTransport(self.nixl, self.cache.tensor, offered.nixl, shape, self.config.kv_transfer_timeout)
        if choice in ("cuda_ipc", "shm") and not same_host:
            # The decode side relies on this: a peer of another hostname can only write over tcp,
            # whose grants it revokes, so it need not hold blocks back for a late write (consumer).
            raise TransferError(f"--kv-transport {choice} needs both instances on one host "
                                f"(the peer is {offered.hostname!r}, we are {self.hostname!r})")
        if choice == "cuda_ipc" or (choice == "auto" and same_host and on_gpu and offered.cuda_ipc is not None):
            if offered.cuda_ipc is None or not on_gpu:
                raise TransferError("cuda_ipc needs both instances' KV caches on CUDA devices of one host")
            from pdserve.kv.transports.cuda_ipc import CudaIpcTransport

            return CudaIpcTransport(self.cache.tensor, offered.cuda_ipc, shape)
        if choice == "shm" or (choice == "auto" and same_host and offered.shm is not None and not on_gpu):
            if offered.shm is None or self.cache.shm_name is None:
                raise TransferError("shm needs both instances' KV caches in host shared memory on one host")
            return ShmTransport(self.cache.tensor, offered.shm, shape)
        tcp = offered.tcp
        if tcp is None:
            raise TransferError("the peer offers no TCP transport")
        return TcpTransport(self.cache.tensor, tcp.host, tcp.port, self.token, self.config.kv_transfer_timeout)

    def _drop_transport(self, host: str, handshake_port: int) -> None:
        t = self._transports.pop((host, handshake_port), None)
        if t is not None:
            t.close()
        self.handshakes.forget(host, handshake_port)

    def _record(self, done: _Done) -> None:
        if done.ok:
            self.stats.bytes_moved += done.nbytes
            self.stats.transfers += 1
            self.stats.transfer_seconds.append(done.seconds)

    # ---- engine-thread interface (overridden per role) -----------------------------------------
    def validate(self, params: KVTransferParams | None, num_prompt_tokens: int) -> None:
        """Raise ValueError (a user-facing message) if `params` cannot be honoured here."""

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
        self._worker.shutdown(wait=False, cancel_futures=True)
        for t in self._transports.values():
            t.close()
        self.handshake_server.close()
        self.notify_server.close()
        self.handshakes.close()
        self.sender.close()
        self.tcp_server.close()
        if self.nixl is not None:
            self.nixl.close()  # waits for a transfer in flight: the cache must stay registered until it ends
