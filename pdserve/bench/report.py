"""Result JSON (vLLM `vllm bench serve` field names, plus per-request detail and SLOs) and the
printed summary table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pdserve.bench.client import VLLM_BACKENDS
from pdserve.bench.goodput import FailureMode, primary_failure_mode
from pdserve.bench.metrics import Distribution, summarize, violations
from pdserve.bench.runner import BenchResult

JsonValue = str | int | float | bool | None | list["JsonValue"] | dict[str, "JsonValue"]

# (attribute, short name, header) as vLLM prints them.
_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
    ("client_queue_time", "Client Queue Time", "Client-side Queueing"),
    ("e2el_including_client_queue", "E2EL incl. Client Queue", "Queue-inclusive End-to-end Latency"),
)


@dataclass(frozen=True)
class ResultMeta:
    """What `pdserve bench` adds to a saved result, with vLLM's flags: --label, --metadata KEY=VALUE
    (top-level keys; a measured field of the same name wins) and --save-detailed (generated_texts)."""

    label: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    detailed: bool = False


def distributions(result: BenchResult) -> list[tuple[str, str, str, Distribution]]:
    """(vLLM metric name, short name, header, statistics) of each --percentile-metrics latency."""
    cfg, m = result.config, result.metrics
    ok = [r for r in result.records if r.success]
    queue = [r.send_time - r.scheduled_time for r in ok]
    extra = {
        "client_queue_time": queue,
        "e2el_including_client_queue": [q + (r.e2el or 0.0) for q, r in zip(queue, ok, strict=True)],
    }
    out = []
    for name, short, header in _SECTIONS:
        if name in cfg.percentile_metrics:
            d = summarize(extra[name], cfg.percentiles) if name in extra else getattr(m, name)
            out.append((name, short, header, d))
    return out


def percentile_word(p: float) -> str:
    """vLLM's key spelling: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if int(p) == p else str(p)


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no inf; vLLM writes "inf"


def _distribution_fields(name: str, d: Distribution) -> dict[str, JsonValue]:
    out: dict[str, JsonValue] = {
        f"mean_{name}_ms": d.mean_ms,
        f"median_{name}_ms": d.median_ms,
        f"std_{name}_ms": d.std_ms,
    }
    for p, v in d.percentiles_ms:
        out[f"p{percentile_word(p)}_{name}_ms"] = v
    return out


def backend_name(result: BenchResult) -> str:
    """vLLM's --backend name of the run: as given, else "openai" (completions) or "openai-chat"."""
    return result.config.backend or VLLM_BACKENDS[result.config.endpoint_type]


def result_json(result: BenchResult, meta: ResultMeta | None = None) -> dict[str, JsonValue]:
    cfg, m, recs = result.config, result.metrics, result.records
    meta = meta or ResultMeta()
    w = cfg.workload
    failure = primary_failure_mode(recs, cfg.slos) if cfg.slos else None
    backend = backend_name(result)
    out: dict[str, JsonValue] = {
        "date": result.date,
        "endpoint_type": backend,  # vLLM's names: "openai" (completions) or "openai-chat"
        "backend": backend,
        "label": meta.label,
        "model_id": result.model_id,
        "tokenizer_id": result.tokenizer_id,  # --tokenizer's path, the server's /tokenize URL, or None
        "num_prompts": w.num_prompts,
        "request_rate": _num(cfg.request_rate),
        "burstiness": _num(cfg.burstiness),
        "max_concurrency": cfg.max_concurrency,
        **_ramp_up_fields(result),
        "duration": result.duration_s,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input,
        "total_cached_input_tokens": m.total_cached_input,
        "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "input_lens": [r.prompt_len for r in recs],
        "output_lens": [r.output_tokens if r.success else 0 for r in recs],
        "ttfts": [r.ttft or 0.0 for r in recs],
        "itls": [list(r.itl) for r in recs],
        "latencies": [r.e2el or 0.0 for r in recs],
        "start_times": [r.send_time - result.start_time for r in recs],  # s after the benchmark start
        "queue_times": [r.send_time - r.scheduled_time for r in recs],  # waited for --max-concurrency
        **({"generated_texts": [r.generated_text for r in recs]} if meta.detailed else {}),
        "errors": [r.error for r in recs],
        "max_output_tokens_per_s": m.max_output_tokens_per_s,
        "max_concurrent_requests": m.max_concurrent_requests,
    }
    if result.rps_change_events:
        out["rps_change_events"] = [{"rps": rps, "timestamp": t} for rps, t in result.rps_change_events]
    for name, _, _, d in distributions(result):
        out.update(_distribution_fields(name, d))
    if result.phases is not None:  # pdserve's own: where the time went, per role (phases.py)
        out["phases"] = result.phases.to_json()  # type: ignore[assignment]
    out.update(
        {
            "base_url": cfg.base_url,
            "endpoint": cfg.path,
            "dataset_name": w.dataset_name,
            "dataset_path": w.dataset_path,
            "ignore_eos": w.is_random or w.ignore_eos,
            "input_len": w.input_len if w.is_random else None,
            "output_len": w.fixed_output_len,  # None: each ShareGPT reply's length
            "range_ratio": w.range_ratio,
            "output_range_ratio": w.out_range_ratio,
            "random_prefix_len": w.prefix_len,
            "num_prefixes": w.num_prefixes,
            "prompt_stream": cfg.prompt_stream,
            "seed": w.seed,
            "warmup": cfg.warmup,
            "percentiles": list(cfg.percentiles),
            "slos": [{"name": s.name, "threshold_ms": s.threshold_ms, "label": s.label} for s in cfg.slos],
            "good_requests": m.good_count,
            "slo_attainment": m.attainment,
            "primary_failure_mode": _failure_json(failure),
            "requests": [
                {
                    "index": r.index,
                    "start_time": r.send_time - result.start_time,
                    "queue_time": r.send_time - r.scheduled_time,
                    "prompt_len": r.prompt_len,
                    "cached_tokens": r.cached_tokens,
                    "expected_output_len": r.expected_output_len,
                    "output_tokens": r.output_tokens,
                    "ttft": r.ttft,
                    "itl": list(r.itl),
                    "tpot": r.tpot if r.success else None,
                    "e2el": r.e2el,
                    "success": r.success,
                    "good": good,
                    "missed_slos": [s.name for s in violations(r, cfg.slos)] if r.success else [],
                    "error": r.error,
                }
                for r, good in zip(recs, m.good, strict=True)
            ],
        }
    )
    return _with_metadata(out, meta.metadata)


def _ramp_up_fields(result: BenchResult) -> dict[str, JsonValue]:
    ramp = result.config.ramp_up
    if ramp is None:
        return {}
    return {"ramp_up_strategy": ramp.strategy, "ramp_up_start_rps": _int_or_float(ramp.start_rps),
            "ramp_up_end_rps": _int_or_float(ramp.end_rps)}


def _int_or_float(x: float) -> int | float:
    return int(x) if x == int(x) else x


def _with_metadata(out: dict[str, JsonValue], metadata: Sequence[tuple[str, str]]) -> dict[str, JsonValue]:
    """vLLM's place for --metadata keys: after num_prompts; never over a field of the result."""
    extra = {k: v for k, v in metadata if k not in out}
    if not extra:
        return out
    keys = list(out)
    cut = keys.index("num_prompts") + 1
    return {**{k: out[k] for k in keys[:cut]}, **extra, **{k: out[k] for k in keys[cut:]}}


def _failure_json(f: FailureMode | None) -> JsonValue:
    if f is None:
        return None
    return {"label": f.label, "count": f.count, "bad": f.bad, "counts": dict(f.counts)}


def save_result(result: BenchResult, path: str | Path, meta: ResultMeta | None = None, append: bool = False) -> Path:
    """Write the result JSON to `path` (its folder made); `append` (vLLM's --append-result) adds it
    as one more line of the file instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result_json(result, meta), allow_nan=False) + "\n"
    if append:
        with path.open("a", encoding="utf-8") as f:
            if f.tell() and not path.read_text(encoding="utf-8").endswith("\n"):
                f.write("\n")
            f.write(text)
    else:
        path.write_text(text)
    return path


def default_result_filename(result: BenchResult, label: str | None = None) -> str:
    """vLLM's file name: {label}-{rate}qps[-concurrencyN]-{model}-{date}.json, label defaulting to
    the backend; with a ramp-up {label}-ramp-up-{strategy}-{start}qps-{end}qps[...]."""
    cfg = result.config
    label = label or backend_name(result)
    conc = f"-concurrency{cfg.max_concurrency}" if cfg.max_concurrency is not None else ""
    model = result.model_id.split("/")[-1]
    if cfg.ramp_up is not None:
        r = cfg.ramp_up
        rate = f"ramp-up-{r.strategy}-{_int_or_float(r.start_rps)}qps-{_int_or_float(r.end_rps)}qps"
    else:
        rate = f"{float(cfg.request_rate)}qps"
    return f"{label}-{rate}{conc}-{model}-{result.date}.json"


def format_summary(result: BenchResult) -> str:
    cfg, m = result.config, result.metrics
    w = cfg.workload
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    row = lambda label, value, fmt="": lines.append(f"{label:<40} {value:<10{fmt}}")
    row("Endpoint type:", f"{cfg.endpoint_type} ({cfg.path})")
    row("Dataset:", w.dataset_name if w.is_random else f"{w.dataset_name} ({w.dataset_path})")
    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    if cfg.max_concurrency is not None:
        row("Maximum request concurrency:", cfg.max_concurrency)
    if cfg.ramp_up is not None:
        r = cfg.ramp_up
        row("Request rate ramp-up (RPS):", f"{r.strategy} {r.start_rps:g} -> {r.end_rps:g}")
    elif math.isfinite(cfg.request_rate):
        row("Request rate configured (RPS):", cfg.request_rate, ".2f")
    row("Benchmark duration (s):", result.duration_s, ".2f")
    row("Total input tokens:", m.total_input)
    if m.total_cached_input:
        share = m.total_cached_input / m.total_input
        row("Input tokens from the prefix cache:", f"{m.total_cached_input} ({share:.0%})")
    row("Total generated tokens:", m.total_output)
    row("Request throughput (req/s):", m.request_throughput, ".2f")
    if m.request_goodput is not None:
        row("Request goodput (req/s):", m.request_goodput, ".2f")
    row("Output token throughput (tok/s):", m.output_throughput, ".2f")
    row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s, ".2f")
    row("Peak concurrent requests:", m.max_concurrent_requests, ".2f")
    row("Total token throughput (tok/s):", m.total_token_throughput, ".2f")
    for _, short, header, d in distributions(result):
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", d.mean_ms, ".2f")
        row(f"Median {short} (ms):", d.median_ms, ".2f")
        for p, v in d.percentiles_ms:
            row(f"P{percentile_word(p)} {short} (ms):", v, ".2f")
    if cfg.slos:
        lines.append("{s:{c}^{n}}".format(s="SLO Attainment", n=50, c="-"))
        row("SLOs (ms):", ", ".join(s.spec() for s in cfg.slos))
        row("Requests meeting all SLOs:", f"{m.good_count}/{m.num_requests} ({m.attainment:.1%})")
        failure = primary_failure_mode(result.records, cfg.slos)
        if failure is not None:
            row("Primary failure mode:", f"{failure.label} ({failure.count} of {failure.bad} bad)")
    lines.append("=" * 50)
    return "\n".join(lines)
