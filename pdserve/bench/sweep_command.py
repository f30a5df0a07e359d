"""`pdserve sweep MODEL`: every topology over a range of rates, one report.

    pdserve sweep dummy:qwen3-cpu-bench --topologies standard:2,disagg-write --rates 0.5,1,2,4 \\
        --input-len 112 --output-len 100 --num-prompts 100 --out runs/sweep

Every `pdserve bench` workload flag applies to each run, e.g. `--dataset-name sharegpt --dataset-path
FILE --endpoint-type chat`; each rate (and the warm-up) sends its own prompts of the file.

Writes to --out: results.json (every run, vLLM field names), summary.md (the headline table),
fig3_per_request.png, fig4_attainment*.png and fig5_phases.png (where the time goes, per role, from
every process's /metrics); logs of every process under logs/.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

from pdserve.bench.command import add_bench_arguments, config_from_args
from pdserve.bench.runner import BenchConfig
from pdserve.bench.sweep import (
    BASELINE,
    DEFAULT_TOPOLOGIES,
    HEADLINE_SET,
    Log,
    Series,
    SLOSet,
    SweepConfig,
    default_slo_sets,
    parse_named_url,
    parse_rates,
    parse_slo_set,
    run_sweep,
)
from pdserve.bench.sweep_report import (
    SeriesSummary,
    markdown_summary,
    phase_runs,
    series_from_json,
    summarize,
    sweep_json,
)
from pdserve.bench.workload import WorkloadConfig

_NOT_FOR_SWEEP = {"request_rate": "--rates", "save_result": "--out", "plot_dir": "--out",
                  "slo": "--ttft-slo/--itl-slo/--slo-set", "goodput": "--ttft-slo/--itl-slo/--slo-set",
                  "ramp_up_strategy": "--rates", "ramp_up_start_rps": "--rates", "ramp_up_end_rps": "--rates"}


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
    p.add_argument("sweep_model", metavar="MODEL", nargs="?",
                   help="model every topology serves (HF dir or dummy:<preset>)")
    p.add_argument("--from-results", nargs="+", default=None, metavar="RESULTS.json[.gz]",
                   help="run nothing: re-render summary.md and the figures of earlier sweeps with these SLOs / "
                        "headline rate / baseline (into --out, default the first file's folder); several files are "
                        "merged: each series gets every rate of every file, a later file's run replacing an "
                        "earlier one at the same rate")
    p.add_argument("--topologies", default=",".join(DEFAULT_TOPOLOGIES),
                   help="comma list of standard:N, disagg-read, disagg-write[:XpYd | :Zb (Z both) | :XpYdZb]; "
                        "'' for none (default %(default)s)")
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
    p.add_argument("--out", default=None, help="output folder (default runs/sweep)")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="FRACTION",
                   help="before each rate, wait until other programs keep the machine at most this busy "
                        "(e.g. 0.2 on a shared machine)")
    p.add_argument("--wait-quiet-timeout", type=float, default=120.0, metavar="S",
                   help="longest wait for --wait-quiet per rate (default %(default)g)")
    add_bench_arguments(p)
    p.set_defaults(func=run, warmup=4, timeout=600.0, no_progress=True)
    for action in p._actions:  # bench flags a sweep replaces: hidden from --help, refused in run()
        if action.dest in _NOT_FOR_SWEEP:
            action.help = argparse.SUPPRESS


def _slo_sets(args: argparse.Namespace) -> tuple[SLOSet, ...]:
    return default_slo_sets(args.ttft_slo, args.itl_slo) + tuple(args.slo_set)


def config_from_sweep_args(args: argparse.Namespace) -> SweepConfig:
    if not args.sweep_model:
        raise ValueError("MODEL is required (or --from-results FILE)")
    for dest, instead in _NOT_FOR_SWEEP.items():
        if getattr(args, dest) not in (None, [], float("inf")):
            raise ValueError(f"--{dest.replace('_', '-')}: `pdserve sweep` sets this itself; use {instead}")
    bench = config_from_args(argparse.Namespace(**{**vars(args), "base_url": "", "slo": []}))
    topologies = tuple(t.strip() for t in args.topologies.split(",") if t.strip())
    return SweepConfig(
        model=args.sweep_model, bench=bench, rates=args.rates, topologies=topologies, external=tuple(args.base_url),
        slo_sets=_slo_sets(args), headline_set=args.headline_set,
        headline_rate=args.headline_rate, baseline=args.baseline, warmup=args.warmup,
        engine_args=tuple(shlex.split(args.engine_args)), proxy_args=tuple(shlex.split(args.proxy_args)),
        startup_timeout_s=args.startup_timeout, out_dir=args.out or "runs/sweep", quiet_busy=args.wait_quiet,
        quiet_timeout_s=args.wait_quiet_timeout,
    )


def write_outputs(cfg: SweepConfig, series: Sequence[Series],
                  with_json: bool = True) -> tuple[tuple[SeriesSummary, ...], list[Path]]:
    """results.json (unless not `with_json`), summary.md, Figure 3 and Figure 4 in cfg.out_dir (the
    figures last: results and summary are on disk even where matplotlib fails to import)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(cfg, series)
    paths = []
    if with_json:
        paths.append(out / "results.json")
        paths[0].write_text(json.dumps(sweep_json(cfg, series, summaries), allow_nan=False) + "\n")
    paths.append(out / "summary.md")
    paths[-1].write_text(markdown_summary(cfg, summaries))
    from pdserve.bench.phase_plots import plot_phases  # matplotlib only here
    from pdserve.bench.sweep_plots import plot_fig3, plot_fig4

    if (fig3 := plot_fig3(cfg, series, out / "fig3_per_request.png")) is not None:
        paths.append(fig3)
    paths += plot_fig4(cfg, summaries, out)
    if (fig5 := plot_phases(phase_runs(summaries), out / "fig5_phases.png")) is not None:
        paths.append(fig5)
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


def load_results(path: str) -> dict:
    """A results.json (or .json.gz) written by `pdserve sweep`."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def rerender(args: argparse.Namespace) -> int:
    """--from-results: the report of earlier sweeps under this command line's SLOs and headline."""
    files = [load_results(path) for path in args.from_results]
    data = files[0]
    keys = ("input_len", "output_len", "prefix_len", "num_prefixes", "dataset_name", "dataset_path", "endpoint_type")
    for other in files[1:]:
        if {k: other["workload"].get(k, 0) for k in keys} != {k: data["workload"].get(k, 0) for k in keys}:
            raise ValueError("--from-results: the files were measured with different workloads")
    merged: dict[str, Series] = {}
    for f in files:
        for s in series_from_json(f):
            old = merged.get(s.name)
            points = {p.rate: p for p in (old.points if old else ())} | {p.rate: p for p in s.points}
            merged[s.name] = replace(s, points=tuple(points[r] for r in sorted(points)))
    series = tuple(merged.values())
    w = data["workload"]
    workload = WorkloadConfig(num_prompts=w["num_prompts"], input_len=w["input_len"], output_len=w["output_len"],
                              range_ratio=w.get("range_ratio", 0.0), prefix_len=w.get("prefix_len", 0),
                              num_prefixes=w.get("num_prefixes", 1), seed=w.get("seed", 0),
                              dataset_name=w.get("dataset_name", "random"), dataset_path=w.get("dataset_path"),
                              sharegpt_output_len=w.get("sharegpt_output_len"),
                              custom_output_len=w.get("custom_output_len", 256))
    cfg = SweepConfig(
        model=data["model"],
        bench=BenchConfig(base_url="", workload=workload, endpoint_type=w.get("endpoint_type", "completions")),
        rates=tuple(sorted({float(r) for f in files for r in f["rates"]})),
        topologies=tuple(s.name for s in series if s.kind == "topology"),
        external=tuple((s.name, s.base_url) for s in series if s.kind != "topology"), slo_sets=_slo_sets(args),
        headline_set=args.headline_set, headline_rate=args.headline_rate or data["headline_rate"],
        baseline=args.baseline, out_dir=args.out or str(Path(args.from_results[0]).parent),
    )
    _, paths = write_outputs(cfg, series, with_json=False)
    print(markdown_summary(cfg, summarize(cfg, series)))
    for path in paths:
        print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.from_results:
        return rerender(args)
    cfg = config_from_sweep_args(args)
    signal.signal(signal.SIGTERM, _raise_stop)  # unwinds through Topology.__exit__: children stopped
    try:
        return sweep_and_report(cfg, lambda msg: print(msg, file=sys.stderr, flush=True))
    except _Stop:
        print("pdserve sweep: stopped by SIGTERM", file=sys.stderr)
        return 143
