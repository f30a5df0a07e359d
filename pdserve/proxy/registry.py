"""Registration over ZMQ: a ROUTER socket on the registry port receiving `Register` heartbeats.

Instances (DEALER sockets) send a `Register` message at start and every second (docs/protocol.md
section 5), in pdserve's form or vLLM MoRIIO's. Each one admits or refreshes the instance in the
`InstanceTable`; `sweep_forever` evicts those whose heartbeats stopped. A malformed message, a wrong
`--registry-token` or a role/mode that does not fit the topology is logged and dropped: nothing
an instance (or anybody) sends can crash the proxy.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass

import zmq
import zmq.asyncio

from pdserve.kv.messages import MAX_MESSAGE_BYTES, MessageError, Register, decode_register
from pdserve.proxy.instances import InstanceTable

log = logging.getLogger(__name__)


@dataclass
class RegistryStats:
    """Counts of received registration messages, for /metrics."""

    accepted: int = 0
    refused: int = 0
    malformed: int = 0


class RegistryServer:
    """The proxy's ZMQ ROUTER. `bind()` then `await serve_forever()` on the event loop."""

    def __init__(self, table: InstanceTable, host: str, port: int, token: str | None = None) -> None:
        self.table = table
        self.host = host
        self.port = port
        self.token = token
        self.stats = RegistryStats()
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None

    def bind(self) -> int:
        """Bind the ROUTER (port 0: a free one); returns the port."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # larger frames: the peer is disconnected
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
            else:
                sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as e:
            sock.close()
            raise OSError(f"cannot bind the registry on {self.host}:{self.port}: {e}") from None
        self._sock = sock
        log.info("registry listening on tcp://%s:%d", self.host, self.port)
        return self.port

    async def serve_forever(self) -> None:
        assert self._sock is not None, "bind() first"
        while True:
            try:
                frames = await self._sock.recv_multipart()
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM or self._sock.closed:
                    return
                log.warning("registry receive failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            self.handle(frames[-1] if frames else b"")

    def handle(self, payload: bytes) -> None:
        """Decode and apply one registration message; never raises."""
        try:
            reg = decode_register(payload)
        except MessageError as e:
            self.stats.malformed += 1
            if self.stats.malformed <= 10 or self.stats.malformed % 1000 == 0:
                log.warning("malformed registration dropped (%d so far): %s", self.stats.malformed, e)
            return
        if not self._token_ok(reg):
            self.stats.refused += 1
            self.table.refuse(reg.request_address, "wrong or missing registry token")
            return
        try:
            admitted = self.table.register(reg)
        except Exception:  # a bug must not stop the registry
            log.exception("registration of %s failed", reg.request_address)
            admitted = None
        if admitted is None:
            self.stats.refused += 1
        else:
            self.stats.accepted += 1

    def _token_ok(self, reg: Register) -> bool:
        if self.token is None:
            return True
        return reg.token is not None and hmac.compare_digest(reg.token.encode(), self.token.encode())

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._ctx.destroy(linger=0)


async def sweep_forever(table: InstanceTable, interval_s: float) -> None:
    """Evict instances whose heartbeats stopped, every `interval_s`."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            table.sweep()
        except Exception:
            log.exception("instance sweep failed")
