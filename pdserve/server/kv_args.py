"""`serve` flags for the instance's role and KV transfer, turned into a KVTransferConfig."""

from __future__ import annotations

import argparse

from pdserve.config import DEFAULT_HOST, KVTransferConfig
from pdserve.engine.args import positive_float

_DEFAULTS = KVTransferConfig()


def add_kv_transfer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kv transfer (disaggregated roles)")
    g.add_argument("--role", choices=["standalone", "prefill", "decode"], default=_DEFAULTS.role)
    g.add_argument("--kv-mode", choices=["read", "write"], default=_DEFAULTS.kv_mode)
    g.add_argument("--kv-transport", choices=["auto", "shm", "tcp", "cuda_ipc", "nixl"], default=_DEFAULTS.kv_transport,
                   help="auto: cuda_ipc / shm on one host, tcp across hosts; nixl (NIXL over UCX, pip install "
                   "'pdserve[nixl]'): one-sided READ/WRITE, both instances must name it")
    g.add_argument("--kv-host", default=DEFAULT_HOST, help="address peers use to reach this instance's KV ports")
    g.add_argument("--kv-handshake-port", type=int, default=_DEFAULTS.kv_handshake_port, help="0: pick a free one")
    g.add_argument("--kv-notify-port", type=int, default=_DEFAULTS.kv_notify_port, help="0: pick a free one")
    g.add_argument(
        "--kv-lease-seconds",
        type=positive_float,
        default=_DEFAULTS.kv_lease_seconds,
        help="prefill: how long blocks wait for their decode before being reclaimed",
    )
    g.add_argument("--kv-transfer-timeout", type=positive_float, default=_DEFAULTS.kv_transfer_timeout)
    g.add_argument("--proxy-address", default=None, help="HOST:PORT of a proxy's registry: register and heartbeat")
    g.add_argument("--registry-token", default=None,
                   help="shared secret for registration and for peers' handshake/notify/data messages")
    g.add_argument("--kv-load-failure-policy", choices=["fail", "recompute"], default=_DEFAULTS.kv_load_failure_policy)


def kv_transfer_config_from_args(args: argparse.Namespace) -> KVTransferConfig:
    return KVTransferConfig(
        role=args.role,
        kv_mode=args.kv_mode,
        kv_transport=args.kv_transport,
        kv_host=args.kv_host,
        kv_handshake_port=args.kv_handshake_port,
        kv_notify_port=args.kv_notify_port,
        kv_lease_seconds=args.kv_lease_seconds,
        kv_transfer_timeout=args.kv_transfer_timeout,
        kv_load_failure_policy=args.kv_load_failure_policy,
        token=args.registry_token,
    )
