"""Per-request notifications between instances (ZMQ DEALER -> ROUTER), keyed by request id."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import msgspec
import zmq

from pdserve.kv.messages import MessageError, NotifyMessage, bind_socket, decode_notify, encode

log = logging.getLogger(__name__)


class NotifyServer:
    """Receives notify messages in a thread and hands each decoded one to `on_message`."""

    def __init__(self, ctx: zmq.Context, host: str, port: int, on_message: Callable[[NotifyMessage], None],
                 token: str | None = None) -> None:
        self._on_message = on_message
        self._token = token
        self._sock, self.port = bind_socket(ctx, zmq.ROUTER, host, port, 1 << 22)
        self._stop = threading.Event()
        self.num_rejected = 0
        threading.Thread(target=self._run, name="pdserve-notify", daemon=True).start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                frames = self._sock.recv_multipart()
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                continue
            try:
                msg = decode_notify(frames[-1])
                if self._token is not None and msg.token != self._token:
                    raise MessageError("bad token")
            except MessageError as e:
                self.num_rejected += 1
                log.warning("notify: message rejected: %s", e)
                continue
            try:
                self._on_message(msg)
            except Exception:
                log.exception("notify: handler failed")
        self._sock.close(0)

    def close(self) -> None:
        self._stop.set()


class NotifySender:
    """One DEALER per peer address; thread-safe."""

    def __init__(self, ctx: zmq.Context, token: str | None = None) -> None:
        self._ctx = ctx
        self._token = token
        self._socks: dict[tuple[str, int], zmq.Socket] = {}
        self._lock = threading.Lock()

    def send(self, host: str, port: int, msg: NotifyMessage) -> None:
        if self._token is not None:
            msg = msgspec.structs.replace(msg, token=self._token)
        with self._lock:
            sock = self._socks.get((host, port))
            if sock is None:
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 10000)
                sock.setsockopt(zmq.SNDTIMEO, 0)
                sock.connect(f"tcp://{host}:{port}")
                self._socks[(host, port)] = sock
            try:
                sock.send(encode(msg), zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.warning("notify to %s:%d dropped: %s", host, port, e)

    def close(self) -> None:
        with self._lock:
            for s in self._socks.values():
                s.close(0)
            self._socks.clear()
