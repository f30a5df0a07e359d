"""`pdserve up TOPOLOGY MODEL`: start a proxy and its instances on this machine, serve until
Ctrl-C or SIGTERM, then stop every child.

    pdserve up standard dummy:qwen3-tiny --instances 2
    pdserve up disagg dummy:qwen3-tiny --prefill 1 --decode 1 --kv-mode write --port 8000
    pdserve up disagg dummy:qwen3-tiny --both 2      # two `--role both` instances, least-loaded
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from types import FrameType

from pdserve.config import DEFAULT_CORS_ALLOWED, DEFAULT_CORS_ORIGINS, DEFAULT_HOST, DEFAULT_PORT, KV_CACHE_DTYPES
from pdserve.config_file import add_config_arg
from pdserve.engine.args import cpu_list, non_negative_int, port_number, positive_float, positive_int
from pdserve.launch import TopologyError, TopologySpec, default_run_dir, launch_topology, plan_instances
from pdserve.server.frontend_args import add_cors_args, add_root_path_arg, add_tls_server_args, tls_from_args


def cpu_map(text: str) -> tuple[tuple[int, ...], ...]:
    """'0;1' or '0-3;4-7' -> one core tuple per instance."""
    return tuple(cpu_list(part) for part in text.split(";") if part.strip())


def gpu_list(text: str) -> tuple[int, ...]:
    return cpu_list(text)


# The proxy's TLS flags that `up` takes itself (they make it probe its proxy over https), and the
# proxy's other --ssl-* flags (left to --proxy-args), which an abbreviation must not also prefix.
_UP_TLS_FLAGS = ("--ssl-certfile", "--ssl-keyfile")
_OTHER_PROXY_SSL_FLAGS = ("--ssl-ca-certs", "--ssl-cert-reqs")


def proxy_args_text(text: str) -> str:
    """--proxy-args, refused when it gives the proxy --ssl-certfile / --ssl-keyfile (or an
    abbreviation argparse would read as one): `up` would still probe the proxy over http."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    for token in tokens:
        name = token.split("=", 1)[0]
        if (name.startswith("--") and any(f.startswith(name) for f in _UP_TLS_FLAGS)
                and not any(f.startswith(name) for f in _OTHER_PROXY_SSL_FLAGS)):
            raise argparse.ArgumentTypeError(
                f"{name}: give the proxy's TLS to `up` itself (up --ssl-certfile/--ssl-keyfile), which then "
                "serves the proxy over HTTPS and probes it there")
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up", help="start a topology (proxy + instances) on this machine and serve until Ctrl-C",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("topology", choices=("standard", "disagg"))
    p.add_argument("model", help="a local Hugging Face directory or dummy:<preset>")
    p.add_argument("--instances", type=positive_int, default=1, help="standard: standalone instances")
    p.add_argument("--prefill", type=non_negative_int, default=None,
                   help="disagg: prefill instances (default 1, or 0 with --both)")
    p.add_argument("--decode", type=non_negative_int, default=None,
                   help="disagg: decode instances (default 1, or 0 with --both)")
    p.add_argument("--both", type=non_negative_int, default=0,
                   help="disagg: `--role both` instances, each the prefill half of some requests and the decode "
                        "half of others (the proxy routes least-loaded unless --proxy-args say otherwise)")
    p.add_argument("--kv-mode", choices=("read", "write"), default="write",
                   help="disagg: read = proxy serial, decode pulls; write = concurrent, prefill pushes")
    p.add_argument("--kv-transport", choices=("auto", "shm", "tcp", "cuda_ipc", "nixl"), default="auto",
                   help="disagg: the instances' --kv-transport (nixl: pip install 'pdserve[nixl]')")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cpus-per-instance", type=positive_int, default=None, metavar="K",
                   help="pin instance i to usable cores [i*K, (i+1)*K) (default: cores divided evenly)")
    g.add_argument("--cpu-map", type=cpu_map, default=None, metavar="'0;1'",
                   help="explicit cores per instance, ';'-separated, in role order (prefill first)")
    p.add_argument("--gpus", type=gpu_list, default=None, metavar="0,1",
                   help="GPUs split evenly between instances (CUDA_VISIBLE_DEVICES, --device cuda)")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help="the proxy's port; 0 picks one (default %(default)s)")
    p.add_argument("--run-dir", default=None, help="folder for the logs (default runs/up-<timestamp>)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="every instance's KV cache storage (`pdserve serve --kv-cache-dtype`); prefill and decode "
                        "instances must agree")
    p.add_argument("--engine-args", default="", metavar='"..."',
                   help='extra `pdserve serve` flags for every instance, e.g. "--num-kv-blocks 512"')
    p.add_argument("--proxy-args", type=proxy_args_text, default="", metavar='"..."',
                   help="extra `pdserve proxy` flags (its TLS: up's --ssl-certfile / --ssl-keyfile)")
    add_config_arg(p)
    f = p.add_argument_group("the proxy's HTTP front end (vLLM's flags; instances stay on plain HTTP on --host)")
    add_cors_args(f)
    add_tls_server_args(f, client_certs=False)
    add_root_path_arg(f)
    p.add_argument("--startup-timeout", type=positive_float, default=300.0, metavar="S")
    p.add_argument("--stop-timeout", type=positive_float, default=15.0, metavar="S",
                   help="SIGTERM grace before SIGKILL (default %(default)s)")
    p.set_defaults(func=run)


def _kv_cache_dtype_flag(value: str) -> tuple[str, ...]:
    """`--kv-cache-dtype` for every instance (before --engine-args, which win); none for auto."""
    return () if value == "auto" else ("--kv-cache-dtype", value)


def _frontend_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The proxy's CORS, TLS and --root-path flags, those not at their defaults (before --proxy-args)."""
    flags: list[str] = []
    for what, default in (("origins", DEFAULT_CORS_ORIGINS), ("methods", DEFAULT_CORS_ALLOWED),
                          ("headers", DEFAULT_CORS_ALLOWED)):
        value = getattr(args, f"allowed_{what}")
        if value != default:
            flags += [f"--allowed-{what}", json.dumps(list(value))]
    flags += ["--allow-credentials"] if args.allow_credentials else []
    for flag, value in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile),
                        ("--root-path", args.root_path)):
        flags += [flag, value] if value else []
    return tuple(flags)


def spec_from_args(args: argparse.Namespace) -> TopologySpec:
    return TopologySpec(
        kind=args.topology, model=args.model, instances=args.instances, both=args.both,
        prefill=args.prefill if args.prefill is not None else (0 if args.both else 1),
        decode=args.decode if args.decode is not None else (0 if args.both else 1),
        kv_mode=args.kv_mode, kv_transport=args.kv_transport,
        cpus_per_instance=args.cpus_per_instance, cpu_map=args.cpu_map, gpus=args.gpus,
        host=args.host, port=args.port, run_dir=args.run_dir or str(default_run_dir()),
        engine_args=(*_kv_cache_dtype_flag(args.kv_cache_dtype), *shlex.split(args.engine_args)),
        proxy_args=(*_frontend_flags(args), *shlex.split(args.proxy_args)),
        proxy_scheme=tls_from_args(args).scheme,
        startup_timeout_s=args.startup_timeout, stop_grace_s=args.stop_timeout,
    )


class _Stop(Exception):
    """Raised by the SIGTERM/SIGHUP handler to unwind into the cleanup."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    plans = plan_instances(spec)  # ValueError (bad core split) before anything starts
    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stop)
    print(f"starting {spec.label} of {spec.model}; logs in {spec.run_dir}", file=sys.stderr)
    for plan in plans:
        gpus = f", GPUs {plan.gpus}" if plan.gpus is not None else ""
        print(f"  {plan.name}: cores {','.join(map(str, plan.cpus))}{gpus}", file=sys.stderr)
    topo = None
    try:
        topo = launch_topology(spec)
        print(f"pdserve {spec.label} ready: {topo.url}  (Ctrl-C stops it)", flush=True)
        for c in topo.children:
            print(f"  {c.name:<12} pid {c.pid:<8} {c.url}  log {c.log_path}", file=sys.stderr)
        while not (dead := topo.dead()):
            time.sleep(0.5)
        for c in dead:
            print(f"pdserve up: {c.name} exited with code {c.proc.returncode}; log {c.log_path}:\n{c.log_tail()}",
                  file=sys.stderr)
        return 1
    except TopologyError as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop) as e:
        print(f"\nstopping ({type(e).__name__ if isinstance(e, KeyboardInterrupt) else e})...", file=sys.stderr)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        if topo is not None:
            codes = topo.stop()
            print("stopped: " + ", ".join(f"{k} {v}" for k, v in codes.items()), file=sys.stderr)
