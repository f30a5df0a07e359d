"""One-time metadata exchange per peer (ZMQ REQ -> REP): protocol version, fingerprint, layout,
transport descriptors. The server runs in a thread; clients cache results per engine id."""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import zmq

from pdserve.config import ModelConfig
from pdserve.engine.kv_cache import KVLayout
from pdserve.kv.messages import (
    PROTOCOL_VERSION,
    HandshakeError,
    HandshakeReply,
    HandshakeRequest,
    KVLayoutInfo,
    MessageError,
    Transports,
    bind_socket,
    decode_handshake,
    encode,
)
from pdserve.model.kv_quant import dtype_name

log = logging.getLogger(__name__)


class HandshakeRefused(RuntimeError):
    pass


def flat_scales(layout: KVLayout) -> list[float]:
    """A float8 layout's scales as they travel: k0, v0, k1, v1, ... ([] for other dtypes)."""
    return [x for s in layout.scales for x in s]


def layout_info(layout: KVLayout) -> KVLayoutInfo:
    return KVLayoutInfo(
        num_layers=layout.num_layers,
        num_blocks=layout.num_blocks,
        block_size=layout.block_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=dtype_name(layout.dtype),
        block_bytes=layout.block_bytes,
        layer_stride_bytes=layout.layer_bytes,
        kv_scales=flat_scales(layout),
    )


def fingerprint(model: ModelConfig, layout: KVLayout) -> str:
    """Two instances may exchange KV only if this matches: model shape and KV layout (not block count),
    the KV dtype and a float8 cache's scales included."""
    text = repr((model, layout.shape[2:], layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim,
                 layout.dtype, flat_scales(layout)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def kv_format_mismatch(ours: KVLayoutInfo, peer_dtype: str, peer_scales: list[float]) -> str | None:
    """Why a peer storing KV as `peer_dtype` with `peer_scales` cannot exchange blocks with us, or
    None (also when the peer did not say: an older peer, left to the fingerprint)."""
    if not peer_dtype:
        return None
    if peer_dtype != ours.dtype:
        return (f"KV cache dtype mismatch: the peer stores {peer_dtype}, this instance {ours.dtype}; "
                "start the prefill and decode instances with the same --kv-cache-dtype")
    if list(peer_scales) != list(ours.kv_scales):
        return (f"KV cache scales differ (the peer's k/v scales {peer_scales}, ours {ours.kv_scales}): "
                "both instances must load the same checkpoint's k_scale / v_scale with the same --kv-cache-dtype")
    return None


class HandshakeServer:
    def __init__(self, ctx: zmq.Context, host: str, port: int, reply: HandshakeReply,
                 token: str | None = None) -> None:
        self._reply = reply
        self._token = token
        # Each peer that completed a handshake (so knows our segment), by engine id.
        self.peers: dict[str, HandshakeRequest] = {}
        self._sock, self.port = bind_socket(ctx, zmq.REP, host, port, 1 << 20)
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="pdserve-handshake", daemon=True).start()

    def _answer(self, data: bytes) -> bytes:
        try:
            msg = decode_handshake(data)
        except MessageError as e:
            log.warning("handshake: malformed message dropped: %s", e)
            return encode(HandshakeError(reason=f"malformed handshake: {e}"))
        if not isinstance(msg, HandshakeRequest):
            return encode(HandshakeError(reason="expected a handshake request"))
        if self._token is not None and msg.token != self._token:
            return encode(HandshakeError(reason="bad token"))
        if msg.protocol_version != PROTOCOL_VERSION:
            return encode(HandshakeError(
                reason=f"protocol version {msg.protocol_version} != ours ({PROTOCOL_VERSION})"))
        mismatch = kv_format_mismatch(self._reply.layout, msg.kv_dtype, msg.kv_scales)
        if mismatch is not None:
            return encode(HandshakeError(reason=mismatch))
        if msg.fingerprint != self._reply.fingerprint:
            return encode(HandshakeError(
                reason=f"model/KV layout fingerprint {msg.fingerprint} != ours ({self._reply.fingerprint}): "
                "the two instances must serve the same model with the same dtype and block size"))
        self.peers[msg.engine_id] = msg
        return encode(self._reply)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                self._sock.send(self._answer(self._sock.recv()))
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                log.exception("handshake server error")
        self._sock.close(0)

    def close(self) -> None:
        self._stop.set()


class HandshakeClient:
    """Handshakes in a background thread, once per (host, port); results (or failures) cached."""

    def __init__(self, ctx: zmq.Context, request: HandshakeRequest, timeout: float = 5.0) -> None:
        self._ctx = ctx
        self._request = request
        self._timeout_ms = int(timeout * 1000)
        self._cache: dict[tuple[str, int], Future[HandshakeReply]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pdserve-handshake-client")

    def get(self, host: str, port: int) -> Future[HandshakeReply]:
        key = (host, port)
        with self._lock:
            fut = self._cache.get(key)
            if fut is None or (fut.done() and fut.exception() is not None and
                               not isinstance(fut.exception(), HandshakeRefused)):
                fut = self._pool.submit(self._shake, host, port)
                self._cache[key] = fut
            return fut

    def forget(self, host: str, port: int) -> None:
        with self._lock:
            self._cache.pop((host, port), None)

    def _shake(self, host: str, port: int) -> HandshakeReply:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, self._timeout_ms)
        sock.setsockopt(zmq.SNDTIMEO, self._timeout_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        try:
            sock.connect(f"tcp://{host}:{port}")
            sock.send(encode(self._request))
            try:
                reply = decode_handshake(sock.recv())
            except zmq.Again:
                raise TimeoutError(f"no handshake reply from {host}:{port}") from None
        finally:
            sock.close(0)
        if isinstance(reply, HandshakeError):
            raise HandshakeRefused(f"peer {host}:{port} refused the handshake: {reply.reason}")
        if not isinstance(reply, HandshakeReply):
            raise HandshakeRefused(f"peer {host}:{port} sent an unexpected handshake message")
        mismatch = kv_format_mismatch(reply.layout, self._request.kv_dtype, self._request.kv_scales)
        if mismatch is not None:
            raise HandshakeRefused(f"peer {host}:{port}: {mismatch}")
        if reply.fingerprint != self._request.fingerprint:
            raise HandshakeRefused(f"peer {host}:{port} serves a different model or KV layout")
        return reply

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["HandshakeClient", "HandshakeServer", "HandshakeRefused", "Transports", "fingerprint", "flat_scales",
           "kv_format_mismatch", "layout_info"]
