"""`pdserve proxy`: the router in front of prefill/decode (disagg) or standalone (standard) instances."""

from __future__ import annotations

import argparse
import gc
import logging
import socket
from types import FrameType

from pdserve.config import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_REGISTRY_PORT
from pdserve.config_file import add_config_arg
from pdserve.engine.args import port_number
from pdserve.proxy.settings import (
    DEFAULT_GRACEFUL_SHUTDOWN_S,
    DEFAULT_HEALTH_INTERVAL_S,
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    InstanceTLS,
    ProxySettings,
)
from pdserve.server.frontend_args import add_frontend_args, existing_file, frontend_from_args

_EPILOG = """\
Instances register themselves over ZMQ (`pdserve serve ... --proxy-address HOST:REGISTRY_PORT`) or
are listed here (--prefill/--decode/--instance URL; health-checked with GET /health). WRITE mode
needs each instance's KV ports: registered instances send them; static ones must serve GET /kv_info.
An instance served over HTTPS (`pdserve serve --ssl-certfile`) is an https:// URL here, or registers
as one; --instance-ssl-* say how its certificate is checked.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "proxy", help="route requests to instances (disagg: prefill then decode; standard: one instance)",
        description=__doc__, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="HTTP bind address (default %(default)s)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    p.add_argument("--registry-host", default=None, help="ZMQ registry bind address (default: --host)")
    p.add_argument("--registry-port", type=port_number, default=DEFAULT_REGISTRY_PORT,
                   help="ZMQ registry port; 0 picks a free one (default %(default)s)")
    p.add_argument("--no-registry", action="store_true", help="no ZMQ registry: static instances only")
    p.add_argument("--mode", choices=("disagg", "standard"), default="disagg")
    p.add_argument("--kv-mode", choices=("read", "write"), default="read",
                   help="disagg: read = serial, decode pulls; write = concurrent, prefill pushes")
    p.add_argument("--prefill", nargs="+", action="extend", default=[], metavar="URL", help="static prefill instances")
    p.add_argument("--decode", nargs="+", action="extend", default=[], metavar="URL", help="static decode instances")
    p.add_argument("--instance", nargs="+", action="extend", default=[], metavar="URL",
                   help="static standalone instances (standard mode)")
    p.add_argument("--routing", choices=("round-robin", "least-loaded", "prefix"), default="round-robin",
                   help="prefix: cache-aware, a prompt goes where its longest prefix went before "
                        "(prefills in disagg mode, instances in standard mode), unless that one is "
                        "busier than the least loaded by more than 4 requests")
    p.add_argument("--api-key", default=None, help="clients must send `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--instance-api-key", default=None,
                   help="sent to instances (default: the client's Authorization header is forwarded)")
    p.add_argument("--registry-token", default=None, help="registrations without this token are dropped")
    p.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="S",
                   help="evict a registered instance silent this long (default %(default)s)")
    p.add_argument("--health-interval", type=float, default=DEFAULT_HEALTH_INTERVAL_S, metavar="S",
                   help="GET /health period of static instances (default %(default)s)")
    p.add_argument("--fallback", choices=("local-prefill", "fail"), default="local-prefill",
                   help="when no prefill instance works: prefill on the decode instance, or answer 503")
    p.add_argument("--prefill-timeout", type=float, default=None, metavar="S",
                   help="give up on a prefill half after S seconds (default: no limit)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_config_arg(p)
    add_frontend_args(p, instance=False)
    g = p.add_argument_group("HTTPS instances (https:// URLs, or registered by `pdserve serve --ssl-certfile`)")
    g.add_argument("--instance-ssl-ca-certs", type=existing_file, default=None, metavar="FILE",
                   help="the CA certificates (PEM) instances' certificates are checked against (default: the system's)")
    g.add_argument("--instance-ssl-certfile", type=existing_file, default=None, metavar="FILE",
                   help="a client certificate (PEM) for instances that require one (`serve --ssl-cert-reqs 2`)")
    g.add_argument("--instance-ssl-keyfile", type=existing_file, default=None, metavar="FILE",
                   help="the private key of --instance-ssl-certfile, when not in that file")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    return ProxySettings(
        host=args.host, port=args.port, registry_host=args.registry_host or args.host,
        registry_port=None if args.no_registry else args.registry_port, mode=args.mode,
        kv_mode=args.kv_mode.upper(), prefill=tuple(args.prefill), decode=tuple(args.decode),
        instances=tuple(args.instance), routing=args.routing, api_key=args.api_key,
        instance_api_key=args.instance_api_key, registry_token=args.registry_token,
        heartbeat_timeout_s=args.heartbeat_timeout, health_interval_s=args.health_interval,
        fallback=args.fallback, prefill_timeout_s=args.prefill_timeout, max_body_bytes=args.max_body_bytes,
        frontend=frontend_from_args(args, access_log=False),
        instance_tls=InstanceTLS(args.instance_ssl_ca_certs, args.instance_ssl_certfile, args.instance_ssl_keyfile),
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (graceful: in-flight requests finish), then exit 0."""
    import uvicorn

    from pdserve.proxy.app import build_app
    from pdserve.proxy.upstream import instance_ssl_context

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            # The startup heap (~80k objects) out of the collector's reach: a full collection while
            # relaying took ~45 ms, a pause of every stream in flight (as the server's, lifecycle.py).
            gc.collect()
            gc.freeze()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Not recorded as uvicorn does (it re-raises the signal after shutdown): a signal-initiated
            # graceful shutdown exits 0. A second signal forces the exit.
            self.force_exit = self.should_exit
            self.should_exit = True

    settings = settings_from_args(args)
    instance_ssl_context(settings.instance_tls)  # a file that does not load: an error naming its flag, now
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        build_app(settings), host=settings.host, port=settings.port,
        timeout_graceful_shutdown=DEFAULT_GRACEFUL_SHUTDOWN_S,
        **settings.frontend.uvicorn_options(args.log_level),  # type: ignore[arg-type]
    )
    server = Server(config)
    server.run()
    return 0 if server.started else 3
