"""`serve` flags for the instance's role and KV transfer, turned into a KVTransferConfig."""

from __future__ import annotations

import argparse

from pdserve.config import DEFAULT_HOST, KVTransferConfig
from pdserve.engine.args import port_number, positive_float
from pdserve.server import kv_transfer_config

_DEFAULTS = KVTransferConfig()
_EXPLICIT = "_kv_explicit"  # the namespace attribute listing the kv flags given on the command line


class _Given(argparse._StoreAction):
    """Stores the value and records that the flag was given (a --kv-transfer-config field that
    sets it to another value is then a conflict, not an override)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        super().__call__(parser, namespace, values, option_string)
        given = set(getattr(namespace, _EXPLICIT, ()))
        given.add(self.dest)
        setattr(namespace, _EXPLICIT, given)


def add_kv_transfer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kv transfer (disaggregated roles)")
    g.add_argument(kv_transfer_config.FLAG, type=kv_transfer_config.parse, default=None, metavar="JSON",
                   help="vLLM's KVTransferConfig, e.g. '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}': "
                   "kv_role kv_producer/kv_consumer/kv_both -> --role prefill/decode/both; kv_connector NixlConnector "
                   "(--kv-transport nixl) or PdserveConnector (kv_connector_extra_config: kv_mode, kv_transport, "
                   "kv_lease_seconds, kv_transfer_timeout, kv_notify_port); kv_ip -> --kv-host, kv_port -> "
                   "--kv-handshake-port, kv_load_failure_policy (server/kv_transfer_config.py)")
    g.add_argument("--role", action=_Given, choices=["standalone", "prefill", "decode", "both"], default=_DEFAULTS.role,
                   help="both (vLLM's kv_role kv_both): per request the prefill half (do_remote_decode), the "
                   "decode half (do_remote_prefill) or a plain request, as the proxy decides")
    g.add_argument("--kv-mode", action=_Given, choices=["read", "write"], default=_DEFAULTS.kv_mode)
    g.add_argument("--kv-transport", action=_Given, choices=["auto", "shm", "tcp", "cuda_ipc", "nixl"],
                   default=_DEFAULTS.kv_transport,
                   help="auto: cuda_ipc / shm on one host, tcp across hosts; nixl (NIXL over UCX, pip install "
                   "'pdserve[nixl]'): one-sided READ/WRITE, both instances must name it")
    g.add_argument("--kv-host", action=_Given, default=DEFAULT_HOST,
                   help="address peers use to reach this instance's KV ports")
    g.add_argument("--kv-handshake-port", action=_Given, type=port_number, default=_DEFAULTS.kv_handshake_port,
                   help="0: pick a free one")
    g.add_argument("--kv-notify-port", action=_Given, type=port_number, default=_DEFAULTS.kv_notify_port,
                   help="0: pick a free one")
    g.add_argument(
        "--kv-lease-seconds",
        action=_Given,
        type=positive_float,
        default=_DEFAULTS.kv_lease_seconds,
        help="prefill: how long blocks wait for their decode before being reclaimed",
    )
    g.add_argument("--kv-transfer-timeout", action=_Given, type=positive_float, default=_DEFAULTS.kv_transfer_timeout)
    g.add_argument("--proxy-address", default=None, help="HOST:PORT of a proxy's registry: register and heartbeat")
    g.add_argument("--registry-token", default=None,
                   help="shared secret for registration and for peers' handshake/notify/data messages")
    g.add_argument("--kv-load-failure-policy", action=_Given, choices=["fail", "recompute"],
                   default=_DEFAULTS.kv_load_failure_policy,
                   help="decode (vLLM's kv_load_failure_policy): when a request's KV never arrives (peer gone, "
                        "--kv-transfer-timeout), fail it, or compute its prompt here instead (default %(default)s)")


def apply_kv_transfer_config(args: argparse.Namespace) -> None:
    """Set the flags --kv-transfer-config implies (once); ValueError naming it on a bad or conflicting field."""
    kv_transfer_config.apply(args, set(getattr(args, _EXPLICIT, ())))


def kv_transfer_config_from_args(args: argparse.Namespace) -> KVTransferConfig:
    apply_kv_transfer_config(args)
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
