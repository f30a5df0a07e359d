"""The proxy's table of instances: what each one is, whether it is healthy, and its load.

Instances are keyed by their HTTP address (`host:port`). They come from registration (ZMQ, see
registry.py; evicted when heartbeats stop, re-admitted by the next one) or from the command line
(static; health-checked over HTTP, see health.py). Everything here runs on the event loop thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import anyio

from pdserve.kv.messages import Register
from pdserve.proxy.settings import ProxySettings, TransferMode

log = logging.getLogger(__name__)

# B: a `--role both` instance (vLLM's kv_both): a candidate for either half of a request.
RoleCode = Literal["P", "D", "S", "B"]
Scheme = Literal["http", "https"]  # how the proxy calls an instance (https: its --ssl-certfile)
ROLE_NAMES: dict[RoleCode, str] = {"P": "prefill", "D": "decode", "S": "standalone", "B": "both"}


def split_url(url: str) -> tuple[Scheme, str]:
    """`https://host:port/` -> ("https", "host:port"); `host:port` and `http://...` -> ("http", ...);
    ValueError when there is no port."""
    addr, scheme = url.strip(), "http"
    for prefix in ("http://", "https://"):
        if addr.startswith(prefix):
            addr, scheme = addr.removeprefix(prefix), prefix.removesuffix("://")
    addr = addr.rstrip("/")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or "/" in addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, http://host:port or https://host:port, got {url!r}")
    return scheme, addr  # type: ignore[return-value]


@dataclass(eq=False)
class Lease:
    """One upstream call in flight on an instance. `abort()` (on eviction) cancels the call's scope."""

    instance: Instance
    scope: anyio.CancelScope | None = None
    lost: str | None = None  # why the call was aborted

    def abort(self, reason: str) -> None:
        self.lost = reason
        if self.scope is not None:
            self.scope.cancel()


@dataclass(eq=False)
class Instance:
    """State of one instance as the proxy sees it."""

    address: str
    role: RoleCode
    static: bool
    engine_id: str = ""
    kv_host: str = ""
    handshake_port: int = 0
    notify_port: int = 0
    transfer_mode: TransferMode | None = None
    scheme: Scheme = "http"
    healthy: bool = False
    last_seen: float = 0.0  # time.monotonic() of the last heartbeat or passed health check
    requests: int = 0  # upstream calls started
    failures: int = 0  # upstream calls that failed (unreachable, 5xx, timeout, dropped)
    leases: set[Lease] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def in_flight(self) -> int:
        return len(self.leases)

    @property
    def kv_ready(self) -> bool:
        """Whether the proxy knows this instance's KV coordinates (needed to pair it in WRITE mode)."""
        return bool(self.engine_id and self.kv_host and self.handshake_port and self.notify_port)


class InstanceTable:
    """All known instances; the single place that admits, evicts and counts them."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self._by_address: dict[str, Instance] = {}
        self._refused: dict[str, str] = {}  # address -> last refusal reason (logged once)
        for role, urls in (("P", settings.prefill), ("D", settings.decode), ("S", settings.instances)):
            for url in urls:
                self.add_static(url, role)  # type: ignore[arg-type]

    def add_static(self, url: str, role: RoleCode) -> Instance:
        """A command-line instance; one URL named by both --prefill and --decode is a both instance."""
        scheme, address = split_url(url)
        known = self._by_address.get(address)
        if known is not None and {known.role, role} == {"P", "D"}:
            role = "B"
        inst = Instance(address=address, role=role, static=True, scheme=scheme)
        self._by_address[address] = inst
        return inst

    def get(self, address: str) -> Instance | None:
        return self._by_address.get(address)

    def all(self) -> list[Instance]:
        return sorted(self._by_address.values(), key=lambda i: (i.role, i.address))

    def static(self) -> list[Instance]:
        return [i for i in self._by_address.values() if i.static]

    def _allowed_roles(self) -> tuple[RoleCode, ...]:
        return ("S",) if self.settings.mode == "standard" else ("P", "D", "B")

    def check(self, role: RoleCode, transfer_mode: TransferMode | None) -> str | None:
        """Why an instance of this role/mode cannot join this proxy's topology (None: it can)."""
        if role not in self._allowed_roles():
            return f"role {ROLE_NAMES[role]} does not belong to a {self.settings.mode} proxy"
        # A both instance serves READ and WRITE halves alike (each request's transfer_mode decides).
        if self.settings.mode == "disagg" and role != "B" and transfer_mode is not None \
                and transfer_mode != self.settings.kv_mode:
            return f"transfer_mode {transfer_mode} differs from the proxy's --kv-mode {self.settings.kv_mode}"
        return None

    def refuse(self, address: str, reason: str) -> None:
        if self._refused.get(address) != reason:
            log.warning("registration of %s refused: %s", address, reason)
            self._refused[address] = reason

    def register(self, reg: Register, now: float | None = None) -> Instance | None:
        """Admit or refresh a registered instance (a heartbeat); None when refused (reason logged)."""
        now = time.monotonic() if now is None else now
        try:
            scheme, address = split_url(reg.request_address)  # `https://host:port`: an HTTPS instance
        except ValueError as e:
            self.refuse(reg.request_address, str(e))
            return None
        reason = self.check(reg.role, reg.transfer_mode)
        if reason is not None:
            self.refuse(address, reason)
            return None
        self._refused.pop(address, None)
        inst = self._by_address.get(address)
        if inst is None or inst.role != reg.role:
            if inst is not None:
                log.warning("instance %s changed role %s -> %s", address, inst.role, reg.role)
                self._abort(inst, "instance changed role")
            inst = self._by_address[address] = Instance(address=address, role=reg.role, static=False)
        elif inst.engine_id and reg.engine_id and inst.engine_id != reg.engine_id:
            log.info("instance %s restarted (engine id %s -> %s)", address, inst.engine_id, reg.engine_id)
        kv_host = reg.host or address.rpartition(":")[0]
        inst.engine_id, inst.kv_host = reg.engine_id, kv_host
        inst.handshake_port, inst.notify_port = reg.handshake_port, reg.notify_port
        inst.transfer_mode, inst.last_seen, inst.scheme = reg.transfer_mode, now, scheme
        if not inst.healthy:
            inst.healthy = True
            log.info("%s instance %s admitted (engine %s)", ROLE_NAMES[inst.role], address, inst.engine_id or "?")
        return inst

    def set_health(self, inst: Instance, ok: bool, reason: str = "", now: float | None = None) -> None:
        """Result of a health check (static instances) or of a failed connection (any instance)."""
        if ok:
            self._refused.pop(inst.address, None)
            inst.last_seen = time.monotonic() if now is None else now
            if not inst.healthy:
                log.info("%s instance %s is healthy", ROLE_NAMES[inst.role], inst.address)
            inst.healthy = True
        elif inst.healthy:
            inst.healthy = False
            log.warning("%s instance %s marked unhealthy: %s", ROLE_NAMES[inst.role], inst.address, reason)

    def sweep(self, now: float | None = None) -> list[Instance]:
        """Evict registered instances whose heartbeats stopped; forget long-dead ones. Returns the evicted."""
        now = time.monotonic() if now is None else now
        timeout = self.settings.heartbeat_timeout_s
        evicted = []
        for inst in list(self._by_address.values()):
            if inst.static:
                continue
            silent = now - inst.last_seen
            if inst.healthy and silent > timeout:
                inst.healthy = False
                evicted.append(inst)
                log.warning(
                    "%s instance %s evicted: no heartbeat for %.1f s", ROLE_NAMES[inst.role], inst.address, silent
                )
                self._abort(inst, f"instance evicted: no heartbeat for {silent:.1f} s")
            elif not inst.healthy and silent > max(60.0, 20 * timeout) and not inst.leases:
                del self._by_address[inst.address]
        return evicted

    def _abort(self, inst: Instance, reason: str) -> None:
        for lease in list(inst.leases):
            lease.abort(reason)

    def candidates(self, role: RoleCode, exclude: frozenset[str] | set[str] = frozenset()) -> list[Instance]:
        """Healthy instances of `role` (both instances count as prefill and as decode), not in
        `exclude` (addresses), usable in this proxy's mode."""
        need_kv = self.settings.mode == "disagg" and self.settings.kv_mode == "WRITE"
        roles = (role, "B") if role in ("P", "D") else (role,)
        return [
            i for i in self._by_address.values()
            if i.role in roles and i.healthy and i.address not in exclude and (i.kv_ready or not need_kv)
        ]

    def acquire(self, inst: Instance) -> Lease:
        """Count one upstream call on `inst` until `release`."""
        lease = Lease(inst)
        inst.leases.add(lease)
        inst.requests += 1
        return lease

    @staticmethod
    def release(lease: Lease) -> None:
        lease.instance.leases.discard(lease)
        lease.scope = None
