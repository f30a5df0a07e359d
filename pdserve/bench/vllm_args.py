"""`vllm bench serve`'s flags that `pdserve bench` takes for compatibility, and the saved result's file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdserve.bench.arg_types import (
    _error,
    _goodput,
    _json_object,
    _key_value,
    _number,
    _percentile_metrics,
    _Refuse,
)
from pdserve.bench.report import default_result_filename
from pdserve.bench.runner import DEFAULT_PERCENTILE_METRICS, PERCENTILE_METRICS, BenchResult

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                  "repetition_penalty")  # vLLM's sampling overrides: request body fields of these names


def _add_vllm_request_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's flags that shape the requests: sampling overrides, body, headers, names."""
    g = p.add_argument_group("sampling parameters (vLLM's; sent in every request body, default: the server's, "
                             "except temperature 0)")
    for flag in SAMPLING_FLAGS:
        g.add_argument("--" + flag.replace("_", "-"), type=int if flag == "top_k" else float, default=None)
    p.add_argument("--extra-body", type=_json_object, default=None, metavar="JSON",
                   help="a JSON object merged over every request body (vLLM's), e.g. "
                        "'{\"chat_template_kwargs\": {\"enable_thinking\": false}}'")
    p.add_argument("--header", nargs="*", type=_key_value, action="extend", default=[], metavar="KEY=VALUE",
                   help="HTTP headers sent with every request (vLLM's)")
    p.add_argument("--logprobs", type=_number(int, 0), default=None,
                   help="logprobs per token asked of /v1/completions (vLLM's)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name requests send (vLLM's; default --model, else the server's first model); "
                        "--model stays the result's model_id")
    p.add_argument("--request-id-prefix", default=None, metavar="PREFIX",
                   help="send X-Request-Id PREFIX<index> with every measured request (vLLM's; default: no header, "
                        "the server names each)")
    p.add_argument("--lora-assignment", choices=("random", "round-robin"), default="random",
                   help="how --lora-modules are given out: drawn at random or in turn (default: %(default)s)")
    p.add_argument("--insecure", action="store_true", help="do not check the server's TLS certificate")


def _add_vllm_run_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's flags about the run and what it reports; the ones that make no sense here."""
    p.add_argument("--goodput", nargs="+", type=_goodput, action="extend", default=[], metavar="KEY:MS",
                   help="vLLM's SLOs for request_goodput, KEY one of ttft, tpot, e2el (the same as --slo KEY:MS)")
    p.add_argument("--percentile-metrics", type=_percentile_metrics, default=DEFAULT_PERCENTILE_METRICS,
                   metavar="NAMES",
                   help=f"latencies reported, comma list of {', '.join(PERCENTILE_METRICS)} (vLLM's; "
                        f"default: {','.join(DEFAULT_PERCENTILE_METRICS)})")
    p.add_argument("--ramp-up-strategy", choices=("linear", "exponential"), default=None,
                   help="raise the request rate from --ramp-up-start-rps to --ramp-up-end-rps over the run, "
                        "instead of --request-rate (vLLM's)")
    p.add_argument("--ramp-up-start-rps", type=_number(float, 0.0), default=None, metavar="RPS")
    p.add_argument("--ramp-up-end-rps", type=_number(float, 0.0), default=None, metavar="RPS")
    p.add_argument("--ready-check-timeout-sec", type=_number(float, 0.0), default=0.0, metavar="S",
                   help="first retry one request (every 5 s) until the server answers it, at most S s "
                        "(vLLM's; default 0: no check)")
    p.add_argument("--tokenizer-mode", choices=("auto", "hf"), default="auto",
                   help="accepted for vLLM's command lines; pdserve counts tokens with the server or --tokenizer")
    for flag in ("--trust-remote-code", "--use-beam-search"):
        p.add_argument(flag, action="store_true", help="accepted for vLLM's command lines; no effect")
    p.add_argument("--profile", action=_Refuse, help="refused: needs vLLM's torch profiler",
                   reason="needs vLLM's profiler (/start_profile, /stop_profile); pdserve bench does not profile. "
                          "Profile the server itself (e.g. py-spy) instead")


def _add_result_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's flags about the saved result (`pdserve bench` only: a sweep writes its own)."""
    p.add_argument("--append-result", action="store_true",
                   help="add the result JSON as one more line of the file instead of replacing it (vLLM's)")
    p.add_argument("--result-dir", default=None, metavar="DIR", help="folder of the --save-result file (vLLM's)")
    p.add_argument("--result-filename", default=None, metavar="NAME",
                   help="name of the --save-result file (vLLM's; default as vLLM names it)")
    p.add_argument("--save-detailed", action="store_true",
                   help="also save each request's generated text (generated_texts); pdserve always saves the other "
                        "per-request fields")
    p.add_argument("--metadata", nargs="*", type=_key_value, action="extend", default=[], metavar="KEY=VALUE",
                   help="top-level fields of the saved result (vLLM's)")
    p.add_argument("--label", default=None,
                   help="the result's label, and the prefix of its vLLM file name (default: the backend)")


def check_result_args(args: argparse.Namespace) -> None:
    """--result-dir / --result-filename with --save-result FILE (which names the file) are an error; a
    result flag without a saved result (--save-result or --append-result) does nothing, as in vLLM: one
    warning line on stderr each, so that vLLM's command lines run unchanged."""
    saving = args.save_result is not None or args.append_result
    for flag, dest in (("--result-dir", "result_dir"), ("--result-filename", "result_filename")):
        if getattr(args, dest) is not None and args.save_result:
            _error(args, f"argument {flag}: not with --save-result FILE (FILE names the file)")
    given = {"--result-dir": args.result_dir is not None, "--result-filename": args.result_filename is not None,
             "--save-detailed": args.save_detailed, "--metadata": bool(args.metadata),
             "--label": args.label is not None}
    for flag, on in given.items():
        if on and not saving:
            print(f"pdserve bench: {flag} has no effect without --save-result or --append-result, as in vLLM",
                  file=sys.stderr)


def result_path(args: argparse.Namespace, result: BenchResult) -> Path | None:
    """Where the result JSON goes: --save-result FILE, else vLLM's --result-dir / --result-filename
    (default name: default_result_filename); None when nothing is saved."""
    if args.save_result:
        return Path(args.save_result)
    if args.save_result is None and not args.append_result:
        return None
    return Path(args.result_dir or ".") / (args.result_filename or default_result_filename(result, args.label))
