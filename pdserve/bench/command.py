"""`pdserve bench`: the command line over run_benchmark, the summary, the JSON and the plots."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence

from tqdm import tqdm

from pdserve.bench.arg_types import (
    _Backend,
    _base_url,
    _error,
    _number,
    _percentiles,
    _positive,
    _range_ratio,
    _slo,
    _token_ids,
    _vocab_range,
)
from pdserve.bench.client import DEFAULT_PATHS
from pdserve.bench.datasets import DATASET_NAMES, DatasetError, load_dataset
from pdserve.bench.metrics import SLO, SLO_NAMES_HELP, parse_slo
from pdserve.bench.phase_report import phase_table
from pdserve.bench.phases import PhaseProbe
from pdserve.bench.report import ResultMeta, format_summary, save_result
from pdserve.bench.runner import BenchConfig, BenchResult, run_benchmark
from pdserve.bench.tokenizer import LocalTokenizer
from pdserve.bench.vllm_args import (
    SAMPLING_FLAGS,
    _add_result_arguments,
    _add_vllm_request_arguments,
    _add_vllm_run_arguments,
    check_result_args,
    result_path,
)
from pdserve.bench.workload import RampUp, WorkloadConfig

DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN, DEFAULT_CUSTOM_OUTPUT_LEN = 1024, 128, 256
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000  # vLLM's, without --base-url
_FILES = ("sharegpt", "custom")
# Dataset-specific flags (flag, dest, default, the datasets it is for): given for another dataset,
# an error rather than silently ignored.
_DATASET_FLAGS = (
    ("--input-len/--random-input-len", "input_len", None, ("random",)),
    ("--random-output-len", "random_output_len", None, ("random",)),
    ("--range-ratio/--random-range-ratio", "range_ratio", (0.0, None), ("random",)),
    ("--random-prefix-len", "random_prefix_len", 0, ("random",)),
    ("--num-prefixes", "num_prefixes", 1, ("random",)),
    ("--vocab-range", "vocab_range", (0, 256), ("random",)),
    ("--exclude-token-ids", "exclude_token_ids", frozenset(), ("random",)),
    ("--sharegpt-output-len", "sharegpt_output_len", None, ("sharegpt",)),
    ("--custom-output-len", "custom_output_len", None, ("custom",)),
    ("--skip-chat-template", "skip_chat_template", False, ("custom",)),
    ("--disable-shuffle", "disable_shuffle", False, _FILES),
)

def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Every `pdserve bench` flag except --base-url (for reuse by `pdserve sweep`)."""
    nonneg_int = _number(int, 0)
    pos_int = _number(int, 1)
    p.add_argument("--endpoint-type", "--backend", dest="endpoint_type", action=_Backend, default="completions",
                   metavar="{completions,chat}",
                   help="completions: streamed /v1/completions; chat: streamed /v1/chat/completions, the prompt as "
                        "one user message. vLLM's spellings are accepted: --backend vllm | openai | openai-chat "
                        "(default: completions)")
    p.set_defaults(backend=None)
    p.add_argument("--endpoint", default=None,
                   help=f"request path (default: {DEFAULT_PATHS['completions']}, or {DEFAULT_PATHS['chat']} "
                        "with --endpoint-type chat)")
    p.add_argument("--model", default=None, help="model name (default: first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME",
                   help="LoRA adapters the server serves; each request names one, drawn at random (vLLM's)")
    p.add_argument("--num-prompts", type=pos_int, default=100, help="requests measured (default: %(default)s)")
    p.add_argument("--dataset-name", choices=DATASET_NAMES, default="random",
                   help="random: random token ids of --input-len tokens; sharegpt: a ShareGPT JSON file's first "
                        "turns, with their replies' lengths; custom: a JSONL file of {\"prompt\": ...} lines "
                        "(default: %(default)s)")
    p.add_argument("--dataset-path", default=None, metavar="FILE", help="the sharegpt or custom dataset file")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a local Hugging Face tokenizer directory (tokenizer.json) of the served model, to count "
                        "a dataset's tokens (default: the server's own /tokenize and /detokenize)")
    p.add_argument("--sharegpt-output-len", type=pos_int, default=None,
                   help="output tokens of every ShareGPT request (default: the reply's token count)")
    p.add_argument("--custom-output-len", type=pos_int, default=None,
                   help=f"output tokens of every custom-dataset request (default: {DEFAULT_CUSTOM_OUTPUT_LEN})")
    p.add_argument("--skip-chat-template", action="store_true",
                   help="custom dataset with completions: send the bare prompt, not its chat-template rendering")
    p.add_argument("--disable-shuffle", action="store_true",
                   help="take a dataset's entries in file order instead of shuffled by --seed")
    p.add_argument("--ignore-eos", action="store_true",
                   help="dataset requests ask for exactly their output length (random requests always do)")
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=pos_int, default=None,
                   help=f"prompt tokens of the random dataset (default: {DEFAULT_INPUT_LEN})")
    p.add_argument("--output-len", type=pos_int, default=None,
                   help=f"output tokens (default: {DEFAULT_OUTPUT_LEN}; with a dataset, as vLLM, it sets "
                        "--sharegpt-output-len / --custom-output-len)")
    p.add_argument("--random-output-len", type=pos_int, default=None,
                   help="output tokens of the random dataset (vLLM's; --output-len wins over it)")
    p.add_argument("--random-prefix-len", type=nonneg_int, default=0,
                   help="tokens of one random prefix shared by every prompt, before its --input-len tokens "
                        "(a system prompt: what prefix caching reuses) (default: %(default)s)")
    p.add_argument("--num-prefixes", type=pos_int, default=1,
                   help="distinct --random-prefix-len prefixes, one drawn per request (default: %(default)s)")
    p.add_argument(
        "--range-ratio",
        "--random-range-ratio",
        dest="range_ratio",
        type=_range_ratio,
        default=(0.0, None),
        metavar="R",
        help="lengths uniform in [len*(1-r), len*(1+r)], r in [0, 1); as vLLM, '{\"input\": r, \"output\": r}' "
             "sets the two apart (default: 0.0)",
    )
    p.add_argument(
        "--vocab-range",
        type=_vocab_range,
        default=(0, 256),
        metavar="LO:HI",
        help="prompt token ids drawn from [LO, HI) (default: 0:256)",
    )
    p.add_argument(
        "--exclude-token-ids",
        type=_token_ids,
        default=frozenset(),
        metavar="ID,ID",
        help="token ids never used in prompts, e.g. special ids inside --vocab-range",
    )
    p.add_argument(
        "--request-rate",
        type=_positive(" (inf = all at once)"),
        default=math.inf,
        help="requests/s, Poisson or gamma arrivals; inf = all at once (default: inf)",
    )
    p.add_argument(
        "--burstiness",
        type=_positive(),
        default=1.0,
        help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier (default: 1)",
    )
    p.add_argument("--max-concurrency", type=pos_int, default=None, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prompts (random ids; a dataset's shuffle) and arrivals (default: 0)")
    p.add_argument("--warmup", "--num-warmups", dest="warmup", type=nonneg_int, default=0,
                   help="warm-up requests sent first, not measured")
    p.add_argument(
        "--slo",
        type=_slo,
        action="append",
        default=[],
        metavar="NAME:MS",
        help=f"SLO criterion, repeatable; NAME is one of {SLO_NAMES_HELP}",
    )
    p.add_argument(
        "--percentiles",
        "--metric-percentiles",
        dest="percentiles",
        type=_percentiles,
        default=(50.0, 90.0, 99.0),
        help="percentiles reported, comma list (default: 50,90,99)",
    )
    p.add_argument("--save-result", nargs="?", const="", default=None, metavar="FILE",
                   help="write the result JSON to FILE; without FILE, as vLLM: --result-dir / --result-filename, "
                        "default {label}-{rate}qps[-concurrencyN]-{model}-{date}.json in the current folder")
    p.add_argument("--plot-dir", default=None, metavar="DIR", help="write per-request PNG plots here")
    p.add_argument("--timeout", type=_positive(), default=None, help="per-request timeout, s (default: none)")
    p.add_argument("--no-progress", "--disable-tqdm", dest="no_progress", action="store_true", help="no progress bar")
    _add_vllm_request_arguments(p)
    _add_vllm_run_arguments(p)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (TTFT, ITL, SLO attainment, goodput)",
        description="Prompts (random token ids, or a ShareGPT / custom dataset's) at a Poisson/gamma rate "
                    "against /v1/completions or /v1/chat/completions, streamed; vLLM's `vllm bench serve` flags. "
                    "Against a pdserve proxy, also where the time went per role (every instance's /metrics).",
    )
    p.add_argument("--base-url", type=_base_url, default=None,
                   help="server URL, e.g. http://127.0.0.1:8000 (default: http://--host:--port)")
    p.add_argument("--host", default=None, help=f"server host without --base-url (vLLM's; default {DEFAULT_HOST})")
    p.add_argument("--port", type=_number(int, 1, 65535), default=None,
                   help=f"server port without --base-url (vLLM's; default {DEFAULT_PORT})")
    add_bench_arguments(p)
    _add_result_arguments(p)
    p.set_defaults(func=run, _bench_parser=p)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig of parsed `pdserve bench` (or sweep) flags; a bad combination is an argparse
    error naming the flag (ValueError without the bench parser)."""
    slos = _slos(args)
    lo, hi = args.vocab_range
    if not set(range(lo, hi)) - args.exclude_token_ids:
        _error(args, "argument --exclude-token-ids: excludes every id in --vocab-range")
    _check_dataset_flags(args)
    _check_endpoint(args)
    return BenchConfig(
        base_url=_server_url(args),
        endpoint=args.endpoint,
        endpoint_type=args.endpoint_type,
        tokenizer=args.tokenizer,
        model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
        workload=_workload(args),
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        warmup=args.warmup,
        slos=slos,
        percentiles=args.percentiles,
        timeout_s=args.timeout,
        served_model_name=args.served_model_name,
        extra_body=_extra_body(args),
        headers=dict(args.header),
        request_id_prefix=args.request_id_prefix,
        insecure=args.insecure,
        ramp_up=_ramp_up(args),
        ready_check_timeout_s=args.ready_check_timeout_sec,
        percentile_metrics=args.percentile_metrics,
        backend=args.backend,
    )


def _slos(args: argparse.Namespace) -> tuple[SLO, ...]:
    """--slo criteria, then vLLM's --goodput ones; a criterion named twice is an error."""
    seen: set[str] = set()
    out = []
    for flag, texts in (("--slo", args.slo), ("--goodput", args.goodput)):
        for slo in (parse_slo(t) for t in texts):
            if slo.name in seen:
                _error(args, f"argument {flag}: criterion given twice: {slo.name}")
            seen.add(slo.name)
            out.append(slo)
    return tuple(out)


def _server_url(args: argparse.Namespace) -> str:
    """--base-url, or vLLM's http://--host:--port (not both)."""
    host, port = getattr(args, "host", None), getattr(args, "port", None)
    if args.base_url is not None:
        if host is not None or port is not None:
            _error(args, f"argument {'--host' if host is not None else '--port'}: not allowed with --base-url")
        return args.base_url
    host = host or DEFAULT_HOST
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{port or DEFAULT_PORT}"


def _ramp_up(args: argparse.Namespace) -> RampUp | None:
    """vLLM's --ramp-up-strategy with its two rates, instead of --request-rate."""
    start, end = args.ramp_up_start_rps, args.ramp_up_end_rps
    if args.ramp_up_strategy is None:
        if start is not None or end is not None:
            flag = "--ramp-up-start-rps" if start is not None else "--ramp-up-end-rps"
            _error(args, f"argument {flag}: only with --ramp-up-strategy")
        return None
    if start is None or end is None:
        _error(args, "argument --ramp-up-strategy: needs --ramp-up-start-rps and --ramp-up-end-rps")
    if math.isfinite(args.request_rate):
        _error(args, "argument --request-rate: not with --ramp-up-strategy (the ramp-up sets the rate)")
    if start == 0 or math.isinf(end):
        _error(args, "argument --ramp-up-start-rps: must be > 0, and --ramp-up-end-rps finite")
    if start > end:
        _error(args, "argument --ramp-up-start-rps: must be <= --ramp-up-end-rps")
    return RampUp(args.ramp_up_strategy, start, end)


def _extra_body(args: argparse.Namespace) -> dict[str, object]:
    """What every request body gets on top (vLLM's order): --logprobs, the sampling flags, --extra-body."""
    body: dict[str, object] = {}
    if args.logprobs is not None:
        if args.endpoint_type == "chat":
            _error(args, "argument --logprobs: only for completions requests (as vLLM's openai-chat ignores it)")
        body["logprobs"] = args.logprobs
    body.update({k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None})
    body.update(args.extra_body or {})
    return body


def _workload(args: argparse.Namespace) -> WorkloadConfig:
    out_len = args.output_len  # vLLM: --output-len sets every dataset's output length
    in_ratio, out_ratio = args.range_ratio
    return WorkloadConfig(
        num_prompts=args.num_prompts,
        input_len=args.input_len or DEFAULT_INPUT_LEN,
        output_len=out_len or args.random_output_len or DEFAULT_OUTPUT_LEN,
        range_ratio=in_ratio,
        output_range_ratio=out_ratio,
        prefix_len=args.random_prefix_len,
        num_prefixes=args.num_prefixes,
        vocab_range=args.vocab_range,
        exclude_token_ids=args.exclude_token_ids,
        seed=args.seed,
        lora_modules=tuple(args.lora_modules),
        lora_assignment=args.lora_assignment,
        dataset_name=args.dataset_name,
        dataset_path=args.dataset_path,
        sharegpt_output_len=out_len or args.sharegpt_output_len,
        custom_output_len=out_len or args.custom_output_len or DEFAULT_CUSTOM_OUTPUT_LEN,
        skip_chat_template=args.skip_chat_template,
        disable_shuffle=args.disable_shuffle,
        ignore_eos=args.ignore_eos,
    )


def _check_dataset_flags(args: argparse.Namespace) -> None:
    """--dataset-path goes with sharegpt / custom (and is read now: a bad file is this flag's error),
    random-only flags do not; --tokenizer must be a readable tokenizer directory."""
    name, path = args.dataset_name, args.dataset_path
    for flag, dest, default, names in _DATASET_FLAGS:
        if name not in names and getattr(args, dest) != default:
            _error(args, f"argument {flag}: only for --dataset-name {' or '.join(names)}, not {name}")
    if name == "random":
        if path is not None:
            _error(args, "argument --dataset-path: the random dataset takes no file; pick --dataset-name "
                         "sharegpt or custom")
    else:
        if path is None:
            _error(args, f"argument --dataset-path: --dataset-name {name} needs a file")
        try:
            load_dataset(name, path)
        except DatasetError as e:
            _error(args, str(e))
    if args.tokenizer is not None:
        try:
            LocalTokenizer(args.tokenizer)
        except (OSError, ValueError) as e:
            _error(args, f"argument --tokenizer: {e}")


def _check_endpoint(args: argparse.Namespace) -> None:
    """A chat body to a completions path (or the reverse) is a 4xx for every request: refuse it here."""
    if args.endpoint is None:
        return
    chat_path = args.endpoint.rstrip("/").endswith("chat/completions")
    if chat_path != (args.endpoint_type == "chat"):
        _error(args, f"argument --endpoint: {args.endpoint} does not take --endpoint-type {args.endpoint_type} "
                     f"requests (default path: {DEFAULT_PATHS[args.endpoint_type]})")


def _print_errors(result: BenchResult, limit: int = 5) -> None:
    errors = Counter(r.error.splitlines()[0] if r.error else "" for r in result.records if not r.success)
    for msg, n in errors.most_common(limit):
        print(f"  {n} x {msg[:300]}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    check_result_args(args)
    cfg = config_from_args(args)
    if cfg.warmup:
        print(f"Warming up with {cfg.warmup} requests...", file=sys.stderr)
    bar = tqdm(total=cfg.workload.num_prompts, disable=args.no_progress, desc="bench", unit="req")
    try:
        probe = PhaseProbe.of_proxy(cfg.base_url)  # a pdserve proxy: where the time went, per role
        result = asyncio.run(run_benchmark(cfg, on_done=lambda _rec: bar.update(1), probe=probe))
    except DatasetError as exc:  # e.g. no ShareGPT conversation passes the length filters
        print(f"pdserve bench: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    if result.warmup_failed:
        print(f"warning: {result.warmup_failed}/{cfg.warmup} warm-up requests failed", file=sys.stderr)
    if result.metrics.failed:
        print(f"{result.metrics.failed} requests failed:", file=sys.stderr)
        _print_errors(result)
    print(format_summary(result))
    if result.phases is not None:
        print(phase_table([(cfg.base_url, cfg.request_rate, result.phases)]), end="")
    if (path := result_path(args, result)) is not None:
        meta = ResultMeta(label=args.label, metadata=tuple(args.metadata), detailed=args.save_detailed)
        print(f"Result saved to {save_result(result, path, meta, append=args.append_result)}")
    if args.plot_dir:
        from pdserve.bench.plots import plot_per_request  # matplotlib only when plotting

        for path in plot_per_request(result.records, cfg.slos, args.plot_dir):
            print(f"Plot saved to {path}")
    return 0 if result.metrics.completed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`python -m pdserve.bench.command ...`) until `pdserve` wires it in."""
    parser = argparse.ArgumentParser(prog="pdserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
