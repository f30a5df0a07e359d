"""TCP transport: streamed block bytes between any two hosts.

Frame: [u32 big-endian header length][msgpack header][payload]. Requests:
  read  {op, request_id, block_ids}                 -> {ok, nbytes} + every layer's blocks, layer-major
  write {op, request_id, layer, block_ids, nbytes} + payload -> {ok}
Each instance runs one server thread (a thread per connection); a client keeps one connection
per peer, used by one transfer at a time. The server touches only blocks its owner granted to the
named request, and only until the grant is revoked (`grants.py`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

import msgspec
import torch

from pdserve.kv.transports.base import TransferError, check_ids
from pdserve.kv.transports.grants import POLL_SECONDS, BlockGrants, Op

log = logging.getLogger(__name__)
T = TypeVar("T")
_LEN = struct.Struct(">I")
MAX_HEADER = 1 << 20
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection
# A server connection whose client vanished (its reset lost on a cut link) is probed after this long
# idle and dropped after the probes go unanswered, so its thread ends.
_KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE.items():
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class _Header(msgspec.Struct, omit_defaults=True):
    op: str
    request_id: str = ""
    block_ids: list[int] = []
    layer: int = -1
    nbytes: int = 0
    ok: bool = True
    reason: str = ""
    token: str | None = None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = memoryview(bytearray(n))
    _recv_views(sock, [buf])
    return bytes(buf)


_IOV = 512  # buffers per sendmsg / recvmsg_into call


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first n bytes from a list of buffers."""
    while n and views:
        if n >= views[0].nbytes:
            n -= views[0].nbytes
            views = views[1:]
        else:
            views = [views[0][n:], *views[1:]]
            n = 0
    return views


class _Cancelled(ConnectionError):
    """A server op whose grant was revoked: its connection is dropped."""


def _io(op: Op | None, call: Callable[[], T]) -> T:
    """One socket call; a server op (socket timeout POLL_SECONDS) retries it until its grant is revoked."""
    while True:
        if op is not None and op.cancelled:
            raise _Cancelled("the grant was revoked")
        try:
            return call()
        except TimeoutError:
            if op is None:
                raise


def _send_views(sock: socket.socket, views: list[memoryview], op: Op | None = None) -> None:
    """Scatter-gather send: one syscall for many blocks."""
    views = [v.cast("B") for v in views]
    while views:
        views = _advance(views, _io(op, functools.partial(sock.sendmsg, views[:_IOV])))


def _recv_views(sock: socket.socket, views: list[memoryview], op: Op | None = None) -> None:
    views = [v.cast("B") for v in views]
    while views:
        n = _io(op, functools.partial(sock.recvmsg_into, views[:_IOV]))[0]
        if n == 0:
            raise ConnectionError("peer closed the connection")
        views = _advance(views, n)


def _send_frame(
    sock: socket.socket, header: _Header, payload: list[memoryview] | None = None, op: Op | None = None
) -> None:
    data = msgspec.msgpack.encode(header)
    _send_views(sock, [memoryview(_LEN.pack(len(data)) + data), *(payload or [])], op)


def _recv_header(sock: socket.socket) -> _Header:
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    if n > MAX_HEADER:
        raise TransferError(f"header of {n} bytes exceeds the limit")
    try:
        return msgspec.msgpack.decode(_recv_exact(sock, n), type=_Header)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TransferError(f"malformed header: {e}") from None


def _block_views(cache: torch.Tensor, layers: range, block_ids: list[int]) -> list[memoryview]:
    """Byte views of each (layer, block), layer-major; blocks are contiguous within a layer.
    (Host caches only: a CUDA cache goes through `_Staged`.)"""
    flat = cache.view(torch.uint8).view(cache.shape[0], cache.shape[1], -1)
    return [memoryview(flat[layer, b].numpy()) for layer in layers for b in block_ids]


class _Staged:
    """Host staging for a CUDA cache: the blocks to send are copied out first; received bytes land
    in host memory and are copied to the device by `commit()`."""

    def __init__(self, cache: torch.Tensor, layers: range, block_ids: list[int], load: bool) -> None:
        cache = cache.view(torch.uint8)  # bytes as they are (float8 caches have no index_copy_ kernel)
        self.cache, self.layers, self.ids = cache, layers, torch.tensor(block_ids, device=cache.device)
        part = cache[layers.start : layers.stop].index_select(1, self.ids)
        self.host = part.cpu() if load else torch.empty(part.shape, dtype=cache.dtype, pin_memory=True)
        self.views = _block_views(self.host, range(len(layers)), list(range(len(block_ids))))

    def commit(self) -> None:
        dev = self.host.to(self.cache.device, non_blocking=True)
        self.cache[self.layers.start : self.layers.stop].index_copy_(1, self.ids, dev)
        torch.cuda.synchronize(self.cache.device)


def _views(
    cache: torch.Tensor, layers: range, block_ids: list[int], load: bool
) -> tuple[list[memoryview], _Staged | None]:
    if cache.is_cuda:
        staged = _Staged(cache, layers, block_ids, load)
        return staged.views, staged
    return _block_views(cache, layers, block_ids), None


class TcpServer:
    """Serves reads of and writes into this instance's KV cache."""

    def __init__(self, cache: torch.Tensor, host: str, token: str | None = None) -> None:
        self.cache = cache
        self.token = token
        self.grants = BlockGrants()
        self._sock = socket.create_server((host, 0))
        self.host, self.port = host, self._sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, name="pdserve-kv-tcp", daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        nb = self.cache.shape[1]
        with conn:
            try:
                while True:
                    h = _recv_header(conn)
                    if self.token is not None and h.token != self.token:
                        _send_frame(conn, _Header(op="reply", ok=False, reason="bad token"))
                        return
                    check_ids(h.block_ids, nb)
                    if h.op not in ("read", "write"):
                        raise TransferError(f"unknown op {h.op!r}")
                    with self.grants.use(h.request_id, h.block_ids) as op:
                        conn.settimeout(POLL_SECONDS)
                        self._op(conn, h, op)
                        conn.settimeout(None)
            except _Cancelled:
                with contextlib.suppress(OSError):  # drop what is queued either way: a reset
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                return
            except (ConnectionError, OSError):
                return
            except TransferError as e:
                log.warning("kv tcp: rejected a request: %s", e)
                try:
                    _send_frame(conn, _Header(op="reply", ok=False, reason=str(e)))
                except OSError:
                    pass

    def _op(self, conn: socket.socket, h: _Header, op: Op) -> None:
        if h.op == "read":
            views, _ = _views(self.cache, range(self.cache.shape[0]), h.block_ids, load=True)
            _send_frame(conn, _Header(op="reply", nbytes=sum(v.nbytes for v in views)), views, op)
            return
        if not 0 <= h.layer < self.cache.shape[0]:
            raise TransferError(f"layer {h.layer} out of range")
        views, staged = _views(self.cache, range(h.layer, h.layer + 1), h.block_ids, load=False)
        if h.nbytes != sum(v.nbytes for v in views):
            raise TransferError("payload size does not match the block list")
        _recv_views(conn, views, op)
        if staged is not None:
            staged.commit()
        _send_frame(conn, _Header(op="reply"))

    def close(self) -> None:
        self._stop = True
        self._sock.close()


class TcpTransport:
    name = "tcp"

    def __init__(self, local: torch.Tensor, host: str, port: int, token: str | None = None,
                 timeout: float = 30.0) -> None:
        self.local = local
        self.token = token
        self._addr = (host, port)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _conn(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection(self._addr, timeout=self._timeout)
            except OSError as e:
                raise TransferError(f"cannot connect to KV peer {self._addr}: {e}") from None
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._sock

    def _reply(self, sock: socket.socket) -> _Header:
        h = _recv_header(sock)
        if not h.ok:
            raise TransferError(f"KV peer refused: {h.reason}")
        return h

    def _run(self, fn):
        with self._lock:
            try:
                return fn(self._conn())
            except (OSError, ConnectionError) as e:
                self._drop()
                raise TransferError(f"KV transfer to {self._addr} failed: {e}") from None
            except TransferError:
                self._drop()
                raise

    def _drop(self) -> None:
        """Forget the connection (after a failure, or on close) with a reset: the kernel discards the
        bytes it has not delivered yet. A plain close would keep retrying them after the transfer was
        given up, and once a cut link is back a late write would land in blocks that the peer has
        freed since and given to another request (tests/faults/test_link_cut.py)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self._sock.close()
            self._sock = None

    def read(self, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str) -> int:
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError("block count mismatch")
        views, staged = _views(self.local, range(self.local.shape[0]), dst_block_ids, load=False)

        def go(sock: socket.socket) -> int:
            _send_frame(sock, _Header(op="read", request_id=request_id, block_ids=src_block_ids, token=self.token))
            h = self._reply(sock)
            if h.nbytes != sum(v.nbytes for v in views):
                raise TransferError("peer's block size differs from ours")
            _recv_views(sock, views)
            if staged is not None:
                staged.commit()
            return h.nbytes

        return self._run(go)

    def write_layer(
        self, layer: int, src_block_ids: list[int], dst_block_ids: list[int], *, request_id: str
    ) -> int:
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError("block count mismatch")
        views, _ = _views(self.local, range(layer, layer + 1), src_block_ids, load=True)
        n = sum(v.nbytes for v in views)

        def go(sock: socket.socket) -> int:
            _send_frame(
                sock, _Header(op="write", request_id=request_id, layer=layer, block_ids=dst_block_ids, nbytes=n,
                              token=self.token), views
            )
            self._reply(sock)
            return n

        return self._run(go)

    def close(self) -> None:
        with self._lock:
            self._drop()
