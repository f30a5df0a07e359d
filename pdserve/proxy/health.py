"""Health checks of static instances (URLs given on the command line).

Each is polled with `GET /health` every `--health-interval`; a failure marks it unhealthy, a later
success re-admits it. In disagg mode the proxy also reads `GET /kv_info` (`{"engine_id", "host",
"handshake_port", "notify_port", "role", "transfer_mode"}`) whenever an instance becomes healthy:
WRITE mode needs those coordinates to pair a prefill with a decode instance, so a static instance
without `/kv_info` cannot serve in WRITE mode (register it over ZMQ instead). READ mode needs
nothing: the prefill response carries the coordinates.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import msgspec

from pdserve.proxy.instances import ROLE_NAMES, Instance, InstanceTable, RoleCode

log = logging.getLogger(__name__)

_ROLE_CODES: dict[str, RoleCode] = {
    "P": "P", "D": "D", "S": "S", "prefill": "P", "decode": "D", "standalone": "S",
    "kv_producer": "P", "kv_consumer": "D", "both": "B", "B": "B", "kv_both": "B",
}


class KVInfo(msgspec.Struct, forbid_unknown_fields=False):
    """`GET /kv_info` of a prefill or decode instance."""

    engine_id: str
    host: str
    handshake_port: int
    notify_port: int
    role: str = ""
    transfer_mode: str | None = None


class HealthChecker:
    """Polls the static instances of an `InstanceTable`."""

    def __init__(self, table: InstanceTable, session: aiohttp.ClientSession, headers: dict[str, str]) -> None:
        self.table = table
        self.session = session
        self.headers = headers
        interval = table.settings.health_interval_s
        self.timeout = aiohttp.ClientTimeout(total=max(1.0, 2 * interval))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self.table.static()))

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.table.settings.health_interval_s)
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")

    async def check(self, inst: Instance) -> None:
        was_healthy = inst.healthy
        try:
            async with self.session.get(f"{inst.url}/health", headers=self.headers, timeout=self.timeout) as r:
                await r.read()
                ok, reason = r.status == 200, f"GET /health -> HTTP {r.status}"
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            ok, reason = False, f"GET /health failed: {type(e).__name__}: {e}"
        if ok and not was_healthy and self.table.settings.mode == "disagg":
            refusal = await self._learn_kv_info(inst)
            if refusal is not None:
                self.table.refuse(inst.address, refusal)  # logged once per reason
                ok, reason = False, refusal
        self.table.set_health(inst, ok, reason)

    async def _learn_kv_info(self, inst: Instance) -> str | None:
        """Fill in the instance's KV coordinates; a reason when it does not fit the topology."""
        settings = self.table.settings
        try:
            async with self.session.get(f"{inst.url}/kv_info", headers=self.headers, timeout=self.timeout) as r:
                body = await r.read()
                status = r.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            return f"GET /kv_info failed: {type(e).__name__}: {e}"  # it answered /health: retried next round
        if status != 200:  # READ needs no coordinates; WRITE cannot pair an instance without them
            return f"GET /kv_info -> HTTP {status}: WRITE mode needs it (or registration)" if (
                settings.kv_mode == "WRITE") else None
        try:
            info = msgspec.json.decode(body, type=KVInfo)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return f"bad /kv_info: {e}"
        role = _ROLE_CODES.get(info.role, inst.role) if info.role else inst.role
        mode = info.transfer_mode.upper() if info.transfer_mode else None
        # A both instance named by one of --prefill / --decode serves as that half only.
        if role != inst.role and not (role == "B" and inst.role in ("P", "D")):
            return f"/kv_info says role {info.role!r}, the command line says {ROLE_NAMES[inst.role]}"
        reason = self.table.check(role, mode if mode in ("READ", "WRITE") else None)  # type: ignore[arg-type]
        if reason is not None:
            return reason
        inst.engine_id, inst.kv_host = info.engine_id, info.host or inst.address.rpartition(":")[0]
        inst.handshake_port, inst.notify_port = info.handshake_port, info.notify_port
        inst.transfer_mode = mode if mode in ("READ", "WRITE") else None  # type: ignore[assignment]
        return None
