"""What an instance opens once for KV transfer: its identity, sockets, threads and transports.

A `TransferContext` is built once per instance (`TransferContext.open`) and handed to the
connector's constructor. A prefill or decode instance's connector is its only user; a both
instance's two halves (kv/both.py) share one, so nothing is opened twice: one engine id, one
handshake server, one notify socket, one TCP data server, one NIXL agent, one transfer worker,
one set of stats. Per-request state is never here: each connector keeps its own.

Threads: `on_notify` runs on the notify server's thread; `transport` / `drop_transport` and the
`transports` cache on the transfer worker only.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from pdserve.config import EngineConfig, KVTransferConfig, ModelConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.request import Request
from pdserve.kv.handshake import HandshakeClient, HandshakeServer, fingerprint, layout_info
from pdserve.kv.messages import (
    PROTOCOL_VERSION,
    HandshakeReply,
    HandshakeRequest,
    NotifyMessage,
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


def _not_yet(msg: NotifyMessage) -> None:
    """Notify messages before a connector routes them: none can come, no peer knows our ports yet."""


def _keep(request: Request) -> None:
    """The release hook until the engine sets the scheduler's."""


@dataclass(eq=False)
class TransferContext:
    """The shared half of a KV connector. Fixed once opened, but for three hooks set after the
    connector exists: `on_notify` (by the connector that routes notify messages), `release` (by
    the engine: frees a request's blocks) and `http_port` (by the server, once it knows it)."""

    config: KVTransferConfig
    cache: KVCache
    token: str | None = field(repr=False)  # the --registry-token secret: never in a repr
    engine_id: str
    host: str
    hostname: str  # what peers compare theirs with (shm, cuda_ipc: same host only)
    fingerprint: str
    zmq_context: zmq.Context
    tcp_server: TcpServer
    nixl: NixlAgent | None  # only with --kv-transport nixl (importing nixl loads UCX)
    handshake_server: HandshakeServer
    sender: NotifySender
    handshakes: HandshakeClient
    worker: ThreadPoolExecutor  # the transfer worker: one thread, FIFO
    notify_server: NotifyServer = field(init=False)
    stats: KVTransferStats = field(default_factory=KVTransferStats)
    transports: dict[tuple[str, int], KVTransport] = field(default_factory=dict)  # worker thread only
    on_notify: Callable[[NotifyMessage], None] = _not_yet
    release: Callable[[Request], None] = _keep
    http_port: int | None = None

    @classmethod
    def open(cls, config: EngineConfig, model: ModelConfig, cache: KVCache, token: str | None = None
             ) -> TransferContext:
        """Bind the handshake, notify and TCP data servers, and start the transfer worker."""
        kt = config.kv_transfer
        engine_id = uuid.uuid4().hex[:16]
        hostname = socket.gethostname()
        zmq_context = zmq.Context()
        fp = fingerprint(model, cache.layout)
        tcp_server = TcpServer(cache.tensor, kt.kv_host, token)
        transports = Transports(tcp=TcpDescriptor(kt.kv_host, tcp_server.port), hostname=hostname)
        if cache.tensor.is_cuda:
            from pdserve.kv.transports.cuda_ipc import export_cache

            transports.cuda_ipc = export_cache(cache.tensor)
        if cache.shm_name is not None:
            transports.shm = ShmDescriptor(cache.shm_name, cache.layout.total_bytes, hostname)
        nixl: NixlAgent | None = None
        if kt.kv_transport == "nixl":
            from pdserve.kv.transports.nixl import NixlAgent

            nixl = NixlAgent(engine_id, cache.tensor, kt.kv_host)
            transports.nixl = nixl.descriptor()
        reply = HandshakeReply(PROTOCOL_VERSION, engine_id, fp, layout_info(cache.layout), transports)
        ctx = cls(
            config=kt, cache=cache, token=token, engine_id=engine_id, host=kt.kv_host, hostname=hostname,
            fingerprint=fp, zmq_context=zmq_context, tcp_server=tcp_server, nixl=nixl,
            handshake_server=HandshakeServer(zmq_context, kt.kv_host, kt.kv_handshake_port, reply, token),
            sender=NotifySender(zmq_context, token),
            handshakes=HandshakeClient(zmq_context, HandshakeRequest(
                PROTOCOL_VERSION, engine_id, fp, token, hostname, cache.shm_name, reply.layout.dtype,
                reply.layout.kv_scales)),
            worker=ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-kv-transfer"),
        )
        ctx.notify_server = NotifyServer(zmq_context, kt.kv_host, kt.kv_notify_port,
                                         lambda msg: ctx.on_notify(msg), token)  # late-bound: set by the connector
        return ctx

    # ---- worker thread -------------------------------------------------------------------------
    def transport(self, host: str, handshake_port: int) -> KVTransport:
        """Handshake (cached) and open the transport to a peer."""
        key = (host, handshake_port)
        t = self.transports.get(key)
        if t is not None:
            return t
        try:
            reply = self.handshakes.get(host, handshake_port).result(timeout=self.config.kv_transfer_timeout)
        except Exception as e:
            self.stats.handshake_failures += 1
            self.handshakes.forget(host, handshake_port)
            raise TransferError(f"handshake with {host}:{handshake_port} failed: {e}") from None
        t = self._open_transport(reply)
        self.transports[key] = t
        return t

    def _open_transport(self, reply: HandshakeReply) -> KVTransport:
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

    def drop_transport(self, host: str, handshake_port: int) -> None:
        """Forget a peer after a failed transfer: the next one handshakes again."""
        t = self.transports.pop((host, handshake_port), None)
        if t is not None:
            t.close()
        self.handshakes.forget(host, handshake_port)

    # ---- engine thread -------------------------------------------------------------------------
    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
        for t in self.transports.values():
            t.close()
        self.handshake_server.close()
        self.notify_server.close()
        self.handshakes.close()
        self.sender.close()
        self.tcp_server.close()
        if self.nixl is not None:
            self.nixl.close()  # waits for a transfer in flight: the cache must stay registered until it ends
