"""vLLM's HTTP front-end flags, on `pdserve serve` and `pdserve proxy` (and, for the proxy it
starts, `pdserve up`): CORS (--allowed-origins, --allowed-methods, --allowed-headers,
--allow-credentials), TLS (--ssl-keyfile, --ssl-certfile, --ssl-ca-certs, --ssl-cert-reqs),
--root-path, --uvicorn-log-level, --disable-uvicorn-access-log; `serve` also takes the request
logging flags (--enable-log-requests, --disable-log-requests, --max-log-len). Turned into one
frozen `FrontendConfig`; a bad value is a usage error naming its flag.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl

from pdserve.config import (
    DEFAULT_CORS_ALLOWED,
    DEFAULT_CORS_ORIGINS,
    UVICORN_LOG_LEVELS,
    CORSConfig,
    FrontendConfig,
    TLSConfig,
)
from pdserve.engine.args import non_negative_int


def json_str_list(text: str) -> tuple[str, ...]:
    """A JSON list of strings (vLLM's CORS flags), e.g. '["https://example.com"]'."""
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, e.g. '[\"*\"]', got {text!r}")
    return tuple(values)


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def root_path(text: str) -> str:
    """'' or '/prefix' (a trailing '/' dropped)."""
    if text and not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected a path starting with '/', e.g. /llm, got {text!r}")
    return text.rstrip("/")


def _cert_reqs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value not in (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):
        raise argparse.ArgumentTypeError(f"expected 0 (none), 1 (optional) or 2 (required), got {text!r}")
    return value


def add_cors_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--allowed-origins", type=json_str_list, default=DEFAULT_CORS_ORIGINS, metavar="JSON",
                   help="CORS: origins whose web pages may read the answers, a JSON list, e.g. "
                        "'[\"https://app.example\"]' or '[\"*\"]' (default [], no CORS headers; vLLM's is [\"*\"])")
    default = json.dumps(list(DEFAULT_CORS_ALLOWED))
    for what in ("methods", "headers"):
        g.add_argument(f"--allowed-{what}", type=json_str_list, default=DEFAULT_CORS_ALLOWED, metavar="JSON",
                       help=f"CORS: allowed {what}, a JSON list (default {default}, as vLLM)")
    g.add_argument("--allow-credentials", action="store_true",
                   help="CORS: let browsers send cookies and credentials (Access-Control-Allow-Credentials)")


def add_tls_server_args(g: argparse._ArgumentGroup, client_certs: bool = True) -> None:
    g.add_argument("--ssl-keyfile", type=existing_file, default=None, metavar="FILE",
                   help="TLS: the private key (PEM) of --ssl-certfile, when not in that file")
    g.add_argument("--ssl-certfile", type=existing_file, default=None, metavar="FILE",
                   help="TLS: serve HTTPS with this certificate chain (PEM)")
    if client_certs:
        g.add_argument("--ssl-ca-certs", type=existing_file, default=None, metavar="FILE",
                       help="TLS: the CA certificates (PEM) that client certificates must be signed by")
        g.add_argument("--ssl-cert-reqs", type=_cert_reqs, default=ssl.CERT_NONE, metavar="{0,1,2}",
                       help="TLS: client certificates: 0 not asked for (default), 1 optional, 2 required "
                            "(the ssl module's CERT_NONE / CERT_OPTIONAL / CERT_REQUIRED, as uvicorn)")


def add_root_path_arg(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--root-path", type=root_path, default="", metavar="PATH",
                   help="the path prefix a path-rewriting reverse proxy strips before forwarding (e.g. /llm): "
                        "the app's root_path (its OpenAPI `servers`); requests still arrive without it")


def add_frontend_args(p: argparse.ArgumentParser, *, instance: bool) -> None:
    """The flags on `p` (`instance`: `pdserve serve`, with request logging; else `pdserve proxy`)."""
    g = p.add_argument_group("HTTP front end (vLLM's flags)")
    add_cors_args(g)
    add_tls_server_args(g)
    add_root_path_arg(g)
    g.add_argument("--uvicorn-log-level", default=None, choices=UVICORN_LOG_LEVELS,
                   help="uvicorn's own log level (default: --log-level's)")
    if instance:
        g.add_argument("--enable-log-requests", dest="enable_log_requests", action="store_true", default=False,
                       help="log each engine request as it starts (its id, prompt token ids, sampling parameters, "
                            "LoRA adapter) at INFO on logger pdserve.server.requests; off by default, as vLLM")
        g.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_false",
                       help="vLLM's older spelling: no request logging (the default)")
        g.add_argument("--max-log-len", type=non_negative_int, default=None, metavar="N",
                       help="with --enable-log-requests, log at most N prompt token ids (default: all)")
    else:
        g.add_argument("--disable-uvicorn-access-log", action="store_true",
                       help="accepted for vLLM compatibility: the proxy writes no access log")


def tls_from_args(args: argparse.Namespace) -> TLSConfig:
    """The TLS flags, checked together and loaded once (a key that does not match its certificate,
    a file that is not PEM: a ValueError naming the flags, not a traceback at startup)."""
    tls = TLSConfig(keyfile=args.ssl_keyfile, certfile=args.ssl_certfile,
                    ca_certs=getattr(args, "ssl_ca_certs", None), cert_reqs=getattr(args, "ssl_cert_reqs", 0))
    if not tls.enabled:
        given = [flag for flag, value in (("--ssl-keyfile", tls.keyfile), ("--ssl-ca-certs", tls.ca_certs),
                                          ("--ssl-cert-reqs", tls.cert_reqs)) if value]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --ssl-certfile (HTTPS)")
        return tls
    if tls.cert_reqs != ssl.CERT_NONE and tls.ca_certs is None:
        raise ValueError("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs (the CAs that sign client certificates)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)  # type: ignore[arg-type]
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"--ssl-certfile {tls.certfile}" + (f" / --ssl-keyfile {tls.keyfile}" if tls.keyfile else "")
                         + f": cannot load the certificate and its key: {e}") from None
    if tls.ca_certs is not None:
        try:
            ctx.load_verify_locations(tls.ca_certs)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"--ssl-ca-certs {tls.ca_certs}: cannot load: {e}") from None
    return tls


def frontend_from_args(args: argparse.Namespace, access_log: bool = True) -> FrontendConfig:
    return FrontendConfig(
        cors=CORSConfig(
            allowed_origins=args.allowed_origins,
            allowed_methods=args.allowed_methods,
            allowed_headers=args.allowed_headers,
            allow_credentials=args.allow_credentials,
        ),
        tls=tls_from_args(args),
        root_path=args.root_path,
        uvicorn_log_level=args.uvicorn_log_level,
        access_log=access_log,
    )


def cors_middleware_options(cors: CORSConfig) -> dict[str, object]:
    """Starlette's CORSMiddleware keyword arguments."""
    return {
        "allow_origins": list(cors.allowed_origins),
        "allow_methods": list(cors.allowed_methods),
        "allow_headers": list(cors.allowed_headers),
        "allow_credentials": cors.allow_credentials,
    }
