"""Proxy settings: built once from the CLI (or by a test), frozen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pdserve.config import DEFAULT_HOST, DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT, DEFAULT_REGISTRY_PORT, FrontendConfig

ProxyMode = Literal["disagg", "standard"]
TransferMode = Literal["READ", "WRITE"]
RoutingPolicy = Literal["round-robin", "least-loaded", "prefix"]
FallbackPolicy = Literal["local-prefill", "fail"]

DEFAULT_HEARTBEAT_TIMEOUT_S = 3.0
DEFAULT_HEALTH_INTERVAL_S = 1.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_GRACEFUL_SHUTDOWN_S = 30.0
# A background decode half answers at once; when its WRITE pair's prefill fails first, the proxy waits
# this long for that answer (its response id, to delete) before it closes the connection.
BACKGROUND_ANSWER_S = 5.0


@dataclass(frozen=True)
class InstanceTLS:
    """How the proxy calls HTTPS instances (`https://` URLs, or registered with --ssl-certfile):
    the CAs their certificates are checked against (None: the system's), and a client certificate
    for instances that require one (their --ssl-cert-reqs 2)."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("--instance-ssl-keyfile needs --instance-ssl-certfile")

    @property
    def configured(self) -> bool:
        return any((self.ca_certs, self.certfile, self.keyfile))


@dataclass(frozen=True)
class ProxySettings:
    """Everything the proxy needs; `prefill`/`decode`/`instances` are static instance URLs."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    registry_host: str = DEFAULT_HOST
    registry_port: int | None = DEFAULT_REGISTRY_PORT  # None: no ZMQ registry (static instances only)
    mode: ProxyMode = "disagg"
    kv_mode: TransferMode = "READ"
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()
    routing: RoutingPolicy = "round-robin"
    api_key: str | None = None  # clients must send it (Authorization: Bearer) on /v1/*
    instance_api_key: str | None = None  # sent to instances; None: the client's Authorization is forwarded
    registry_token: str | None = None
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S
    fallback: FallbackPolicy = "local-prefill"
    prefill_timeout_s: float | None = None  # None: no limit (a dead instance is caught by heartbeats)
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_attempts: int = 2  # per half: the first try and one retry on another instance
    frontend: FrontendConfig = field(default_factory=FrontendConfig)  # CORS, TLS, root path, uvicorn logging
    instance_tls: InstanceTLS = field(default_factory=InstanceTLS)

    def __post_init__(self) -> None:
        if self.heartbeat_timeout_s <= 0:
            raise ValueError("--heartbeat-timeout must be > 0")
        if self.prefill_timeout_s is not None and self.prefill_timeout_s <= 0:
            raise ValueError("--prefill-timeout must be > 0")
        if self.max_body_bytes <= 0:
            raise ValueError("--max-body-bytes must be > 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.mode == "standard" and (self.prefill or self.decode):
            raise ValueError("--prefill/--decode are for --mode disagg; use --instance in standard mode")
        if self.mode == "disagg" and self.instances:
            raise ValueError("--instance is for --mode standard; use --prefill/--decode in disagg mode")
