"""`pdserve sweep MODEL`: every topology over a range of rates, one report.

    pdserve sweep dummy:qwen3-cpu-bench --topologies standard:2,disagg-write --rates 0.5,1,2,4 \\
        --input-len 112 --output-len 100 --num-prompts 100 --out runs/sweep

Writes to --out: results.json (every run, vLLM field names), summary.md (the headline table),
fig3_per_request.png and fig4_attainment*.png; logs of every process under logs/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pdserve.bench.command import add_bench_arguments, config_from_args
from pdserve.bench.sweep import (
    BASELINE,
    DEFAULT_TOPOLOGIES,
    HEADLINE_SET,
    Log,
    Series,
    SweepConfig,
    default_slo_sets,
    parse_named_url,
    parse_rates,
    parse_slo_set,
    run_sweep,
)
from pdserve.bench.sweep_report import SeriesSummary, markdown_summary, summarize, sweep_json

_NOT_FOR_SWEEP = {"request_rate": "--rates", "save_result": "--out", "plot_dir": "--out",
                  "slo": "--ttft-slo/--itl-slo/--slo-set"}


def _arg(parse):  # ValueError -> argparse's message
    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return wrapped


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="benchmark every topology over a range of request rates, one report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_model", metavar="MODEL", help="model every topology serves (HF dir or dummy:<preset>)")
    p.add_argument("--topologies", default=",".join(DEFAULT_TOPOLOGIES),
                   help="comma list of standard:N, disagg-read, disagg-write[:XpYd]; '' for none (default %(default)s)")
    p.add_argument("--rates", type=_arg(parse_rates), default=parse_rates("0.5:10:0.5"),
                   help="START:STOP:STEP or a comma list, req/s (default 0.5:10:0.5)")
    p.add_argument("--base-url", type=_arg(parse_named_url), action="append", default=[], metavar="NAME=URL",
                   help="also sweep a running OpenAI-compatible endpoint as series NAME (repeatable)")
    p.add_argument("--ttft-slo", type=float, default=1000.0, metavar="MS", help="TTFT SLO (default %(default)g)")
    p.add_argument("--itl-slo", type=float, default=50.0, metavar="MS",
                   help="ITL SLO, as the request's p99 gap and as TPOT (default %(default)g)")
    p.add_argument("--slo-set", type=_arg(parse_slo_set), action="append", default=[], metavar="NAME=CRIT,...",
                   help="an extra SLO set, e.g. strict=ttft:500,itl_p99:30 (repeatable)")
    p.add_argument("--headline-set", default=HEADLINE_SET, help="SLO set of the headline (default %(default)s)")
    p.add_argument("--headline-rate", type=float, default=None,
                   help="rate of the headline table and Figure 3 (default: the swept rate nearest 0.8 x the highest)")
    p.add_argument("--baseline", default=BASELINE, help="series relative goodput is against (default %(default)s)")
    p.add_argument("--engine-args", default="", metavar='"..."', help="extra `pdserve serve` flags for every instance")
    p.add_argument("--proxy-args", default="", metavar='"..."', help="extra `pdserve proxy` flags")
    p.add_argument("--startup-timeout", type=float, default=300.0, metavar="S")
    p.add_argument("--out", default="runs/sweep", help="output folder (default %(default)s)")
    add_bench_arguments(p)
    p.set_defaults(func=run, warmup=4, timeout=600.0, no_progress=True)
    for action in p._actions:  # bench flags a sweep replaces: hidden from --help, refused in run()
        if action.dest in _NOT_FOR_SWEEP:
            action.help = argparse.SUPPRESS


def config_from_sweep_args(args: argparse.Namespace) -> SweepConfig:
    for dest, instead in _NOT_FOR_SWEEP.items():
        if getattr(args, dest) not in (None, [], float("inf")):
            raise ValueError(f"`pdserve sweep` sets this itself; use {instead}")
    bench = config_from_args(argparse.Namespace(**{**vars(args), "base_url": "", "slo": []}))
    topologies = tuple(t.strip() for t in args.topologies.split(",") if t.strip())
    return SweepConfig(
        model=args.sweep_model, bench=bench, rates=args.rates, topologies=topologies, external=tuple(args.base_url),
        slo_sets=default_slo_sets(args.ttft_slo, args.itl_slo) + tuple(args.slo_set), headline_set=args.headline_set,
        headline_rate=args.headline_rate, baseline=args.baseline, warmup=args.warmup,
        engine_args=tuple(shlex.split(args.engine_args)), proxy_args=tuple(shlex.split(args.proxy_args)),
        startup_timeout_s=args.startup_timeout, out_dir=args.out,
    )


def write_outputs(cfg: SweepConfig, series: Sequence[Series]) -> tuple[tuple[SeriesSummary, ...], list[Path]]:
    """results.json, summary.md, Figure 3 and Figure 4 in cfg.out_dir."""
    from pdserve.bench.sweep_plots import plot_fig3, plot_fig4  # matplotlib only here

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(cfg, series)
    paths = [out / "results.json", out / "summary.md"]
    paths[0].write_text(json.dumps(sweep_json(cfg, series, summaries), allow_nan=False) + "\n")
    paths[1].write_text(markdown_summary(cfg, summaries))
    if (fig3 := plot_fig3(cfg, series, out / "fig3_per_request.png")) is not None:
        paths.append(fig3)
    paths += plot_fig4(cfg, summaries, out)
    return summaries, paths


def sweep_and_report(cfg: SweepConfig, log: Log = print) -> int:
    """Run the sweep, write its outputs, print the summary; 0 when every series ran to the end."""
    rate_list = ", ".join(f"{r:g}" for r in cfg.rates)
    log(f"sweep of {cfg.model}: {', '.join(cfg.topologies + tuple(n for n, _ in cfg.external))} at {rate_list} req/s")
    series = run_sweep(cfg, log)
    _, paths = write_outputs(cfg, series)
    print(markdown_summary(cfg, summarize(cfg, series)))
    for path in paths:
        print(f"wrote {path}")
    return 1 if any(s.error for s in series) else 0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_sweep_args(args)
    signal.signal(signal.SIGTERM, _raise_stop)  # unwinds through Topology.__exit__: children stopped
    try:
        return sweep_and_report(cfg, lambda msg: print(msg, file=sys.stderr, flush=True))
    except _Stop:
        print("pdserve sweep: stopped by SIGTERM", file=sys.stderr)
        return 143
