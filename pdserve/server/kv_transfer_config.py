"""vLLM's `--kv-transfer-config JSON` on `pdserve serve`, mapped onto pdserve's own `--role` / `--kv-*` flags.

The JSON has vLLM's `KVTransferConfig` field names (vllm/config/kv_transfer.py). What each becomes:

* `kv_connector`: `NixlConnector` → `--kv-transport nixl`; `PdserveConnector` → pdserve's own
  transports (`auto` unless `kv_connector_extra_config.kv_transport` says otherwise); any other
  name is refused.
* `kv_role` (required): `kv_producer` → `--role prefill`, `kv_consumer` → `decode`, `kv_both` → `both`.
* `kv_ip` → `--kv-host`; `kv_port` → `--kv-handshake-port` (the one port a peer reaches first, as
  vLLM's connectors use kv_port; its NixlConnector's side channel takes `VLLM_NIXL_SIDE_CHANNEL_PORT`).
* `kv_load_failure_policy` → `--kv-load-failure-policy`.
* `kv_connector_extra_config`: `kv_mode`, `kv_transport`, `kv_lease_seconds`,
  `kv_transfer_timeout`, `kv_notify_port` → the flags of those names; `backends` (NixlConnector's)
  may only name `UCX`; any other key is refused.
* `engine_id`, `kv_buffer_device`, `kv_buffer_size`, `kv_rank`, `kv_parallel_size`: accepted, no
  effect (pdserve picks a fresh engine id per start, so peers and the proxy see a restart; the KV
  cache lives on `--device`).
* `kv_connector_module_path`, `enable_permute_local_kv: true`: refused (no connector modules).

Any other field is refused. A field that sets a flag also given on the command line with another
value is refused, naming both. Errors are `ValueError`s whose message names `--kv-transfer-config`
(the CLI prints them as usage errors).
"""

from __future__ import annotations

import argparse
from typing import Literal

import msgspec

from pdserve.config import KVMode, KVTransportName, Role

FLAG = "--kv-transfer-config"
CONNECTORS = ("NixlConnector", "PdserveConnector")
ROLES: dict[str, Role] = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "both"}


class ExtraConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`kv_connector_extra_config`: pdserve's knobs (their flags' names) and NixlConnector's `backends`."""

    kv_mode: Literal["read", "write", "READ", "WRITE"] | None = None
    kv_transport: KVTransportName | None = None
    kv_lease_seconds: float | None = None
    kv_transfer_timeout: float | None = None
    kv_notify_port: int | None = None
    backends: list[str] | None = None


class VllmKVTransferConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """vLLM's KVTransferConfig, as JSON. Fields whose vLLM default pdserve does not share are
    None here when absent, so that only what was given overrides pdserve's defaults."""

    kv_connector: str | None = None
    engine_id: str | None = None
    kv_buffer_device: Literal["cuda", "cpu", "xpu"] | None = None
    kv_buffer_size: float | None = None
    kv_role: str | None = None
    kv_rank: int | None = None
    kv_parallel_size: int | None = None
    kv_ip: str | None = None
    kv_port: int | None = None
    kv_connector_extra_config: ExtraConfig = msgspec.field(default_factory=ExtraConfig)
    kv_connector_module_path: str | None = None
    enable_permute_local_kv: bool = False
    kv_load_failure_policy: Literal["recompute", "fail"] | None = None


def parse(text: str) -> VllmKVTransferConfig:
    """The flag's JSON → its typed form; argparse.ArgumentTypeError (argparse names the flag)."""
    try:
        return msgspec.json.decode(text, type=VllmKVTransferConfig)
    except msgspec.ValidationError as e:
        raise argparse.ArgumentTypeError(_field_error(str(e))) from None
    except msgspec.DecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def _field_error(msg: str) -> str:
    known = ", ".join(VllmKVTransferConfig.__struct_fields__)
    if msg.startswith("Object contains unknown field"):
        where = "kv_connector_extra_config" if "kv_connector_extra_config" in msg else None
        if where:
            extra = ", ".join(ExtraConfig.__struct_fields__)
            return f"{msg}; kv_connector_extra_config takes {extra}"
        return f"{msg}; vLLM's KVTransferConfig fields are {known}"
    return msg


def flag_values(cfg: VllmKVTransferConfig) -> dict[str, object]:
    """The `serve` flags (argparse dests) that `cfg` sets; ValueError naming --kv-transfer-config."""
    out: dict[str, object] = {}
    if cfg.kv_connector is None:
        raise ValueError(f"{FLAG}: kv_connector is required: one of {', '.join(CONNECTORS)}")
    if cfg.kv_connector not in CONNECTORS:
        raise ValueError(f"{FLAG}: kv_connector {cfg.kv_connector!r} is not supported; pdserve serves "
                         f"{' and '.join(CONNECTORS)} (PdserveConnector: pdserve's shm / tcp / cuda_ipc / nixl "
                         "transports, chosen by kv_connector_extra_config.kv_transport)")
    if cfg.kv_role is None:
        raise ValueError(f"{FLAG}: kv_role is required: one of {', '.join(ROLES)}")
    if cfg.kv_role not in ROLES:
        raise ValueError(f"{FLAG}: kv_role {cfg.kv_role!r} is not one of {', '.join(ROLES)}")
    out["role"] = ROLES[cfg.kv_role]
    if cfg.kv_connector_module_path is not None:
        raise ValueError(f"{FLAG}: kv_connector_module_path is not supported (pdserve loads no connector modules)")
    if cfg.enable_permute_local_kv:
        raise ValueError(f"{FLAG}: enable_permute_local_kv is not supported (pdserve has one KV layout)")
    extra = cfg.kv_connector_extra_config
    transport: KVTransportName | None = extra.kv_transport
    if cfg.kv_connector == "NixlConnector":
        if transport not in (None, "nixl"):
            raise ValueError(f"{FLAG}: kv_connector NixlConnector moves KV over NIXL; "
                             f"kv_connector_extra_config.kv_transport {transport!r} contradicts it")
        transport = "nixl"
    if extra.backends is not None and [b.upper() for b in extra.backends] != ["UCX"]:
        raise ValueError(f"{FLAG}: kv_connector_extra_config.backends {extra.backends!r}: pdserve's NIXL transport "
                         "uses the UCX backend only")
    if transport is not None:
        out["kv_transport"] = transport
    if extra.kv_mode is not None:
        mode: KVMode = "read" if extra.kv_mode.lower() == "read" else "write"
        out["kv_mode"] = mode
    for name in ("kv_lease_seconds", "kv_transfer_timeout"):
        value = getattr(extra, name)
        if value is not None:
            if not value > 0:
                raise ValueError(f"{FLAG}: kv_connector_extra_config.{name} must be > 0, got {value}")
            out[name] = float(value)
    for name, value in (("kv_handshake_port", cfg.kv_port), ("kv_notify_port", extra.kv_notify_port)):
        if value is not None:
            if not 0 <= value <= 65535:
                what = "kv_port" if name == "kv_handshake_port" else "kv_connector_extra_config.kv_notify_port"
                raise ValueError(f"{FLAG}: {what} must be a port (0-65535), got {value}")
            out[name] = value
    if cfg.kv_ip is not None:
        out["kv_host"] = cfg.kv_ip
    if cfg.kv_load_failure_policy is not None:
        out["kv_load_failure_policy"] = cfg.kv_load_failure_policy
    return out


# what each field is called in the JSON, for conflict messages
_SOURCES = {
    "role": "kv_role", "kv_transport": "kv_connector / kv_connector_extra_config.kv_transport",
    "kv_mode": "kv_connector_extra_config.kv_mode", "kv_lease_seconds": "kv_connector_extra_config.kv_lease_seconds",
    "kv_transfer_timeout": "kv_connector_extra_config.kv_transfer_timeout", "kv_handshake_port": "kv_port",
    "kv_notify_port": "kv_connector_extra_config.kv_notify_port", "kv_host": "kv_ip",
    "kv_load_failure_policy": "kv_load_failure_policy",
}


def apply(args: argparse.Namespace, explicit: set[str]) -> None:
    """Set the flags `args.kv_transfer_config` implies (once). A flag in `explicit` (given on the
    command line) with another value → ValueError naming both."""
    cfg: VllmKVTransferConfig | None = getattr(args, "kv_transfer_config", None)
    if cfg is None or getattr(args, "_kv_transfer_config_applied", False):
        return
    for dest, value in flag_values(cfg).items():
        if dest in explicit and getattr(args, dest) != value:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{FLAG} {_SOURCES[dest]} ({value}) conflicts with {flag} {getattr(args, dest)}: "
                             "give one of them")
        setattr(args, dest, value)
    args._kv_transfer_config_applied = True
