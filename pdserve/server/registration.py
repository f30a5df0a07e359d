"""Registration with the proxy: the vLLM-compatible msgpack message over ZMQ, repeated every second
as the heartbeat (a thread of its own, so a long engine step never delays it)."""

from __future__ import annotations

import logging
import threading

import zmq

from pdserve.kv.messages import Register, encode

log = logging.getLogger(__name__)
HEARTBEAT_INTERVAL_S = 1.0


class Registrar:
    def __init__(self, proxy_address: str, message: Register, interval: float = HEARTBEAT_INTERVAL_S) -> None:
        host, _, port = proxy_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--proxy-address must be HOST:PORT, got {proxy_address!r}")
        self._endpoint = f"tcp://{host}:{port}"
        self._payload = encode(message)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-register", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.connect(self._endpoint)
        try:
            while not self._stop.is_set():
                try:
                    sock.send(self._payload, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # proxy not up yet: the next beat tries again
                self._stop.wait(self._interval)
        finally:
            sock.close(0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def register_message(llm, host: str, http_port: int, token: str | None, scheme: str = "http") -> Register:
    """The registration of this instance: role P (prefill), D (decode), B (both: either half, per
    request) or S (standalone). An HTTPS instance (--ssl-certfile) sends `https://host:port` as its
    request_address (vLLM's plain `host:port` otherwise), so the proxy calls it over TLS."""
    conn = llm.connector
    role = {"prefill": "P", "decode": "D", "both": "B"}.get(llm.config.kv_transfer.role, "S")
    return Register(
        role=role,  # type: ignore[arg-type]
        request_address=f"{host}:{http_port}" if scheme == "http" else f"{scheme}://{host}:{http_port}",
        handshake_port=conn.handshake_port if conn else 0,
        notify_port=conn.notify_port if conn else 0,
        transfer_mode=llm.config.kv_transfer.kv_mode.upper(),  # type: ignore[arg-type]
        engine_id=conn.engine_id if conn else "",
        host=conn.host if conn else host,
        token=token,
    )
