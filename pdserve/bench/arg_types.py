"""argparse value types and actions of `pdserve bench` flags, and the error naming a flag."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence

from pdserve.bench.client import BACKEND_ENDPOINTS, ENDPOINT_TYPES
from pdserve.bench.metrics import parse_slo
from pdserve.bench.runner import PERCENTILE_METRICS

GOODPUT_NAMES = ("ttft", "tpot", "e2el")  # vLLM's --goodput keys


def _number(kind: Callable[[str], float], lo: float, hi: float = math.inf, hi_open: bool = False):
    """argparse type: a number in [lo, hi] (or [lo, hi)); the error names the flag via argparse."""

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if math.isnan(v) or v < lo or v > hi or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(f"{text!r} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}")
        return v

    return parse


def _positive(hint: str = ""):
    def parse(text: str) -> float:
        v = _number(float, 0.0)(text)
        if v == 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0{hint}")
        return v

    return parse


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not ps or any(not 0 <= p <= 100 for p in ps):
        raise argparse.ArgumentTypeError(f"{text!r}: percentiles must be in [0, 100]")
    return tuple(dict.fromkeys(ps))


def _vocab_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        rng = (int(lo), int(hi))
    except ValueError:
        rng = (-1, -1)
    if not sep or not 0 <= rng[0] < rng[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO:HI with 0 <= LO < HI")
    return rng


def _token_ids(text: str) -> frozenset[int]:
    try:
        ids = frozenset(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids") from None
    return ids


def _range_ratio(text: str) -> tuple[float, float | None]:
    """vLLM's --random-range-ratio: one ratio in [0, 1) for input and output lengths, or a JSON
    object {"input": r, "output": r}; (input ratio, output ratio or None for the same)."""
    in_range = _number(float, 0.0, 1.0, hi_open=True)
    if not text.lstrip().startswith("{"):
        return in_range(text), None
    try:
        obj = json.loads(text)
        return in_range(str(obj["input"])), in_range(str(obj["output"]))
    except (ValueError, KeyError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a ratio or {{\"input\": R, \"output\": R}} "
                                         "with R in [0, 1)") from None


class _Backend(argparse.Action):
    """--endpoint-type / --backend: completions | chat, or vLLM's --backend names vllm | openai |
    openai-chat (kept as given, for the result's "backend")."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        text = str(values)
        if text in ENDPOINT_TYPES:
            namespace.endpoint_type, namespace.backend = text, None
        elif text in BACKEND_ENDPOINTS:
            namespace.endpoint_type, namespace.backend = BACKEND_ENDPOINTS[text], text
        else:
            names = ", ".join(map(repr, (*ENDPOINT_TYPES, *BACKEND_ENDPOINTS)))
            raise argparse.ArgumentError(self, f"invalid choice: {text!r} (pdserve bench measures streamed text "
                                               f"generation: choose from {names})")


class _Refuse(argparse.Action):
    """A vLLM flag pdserve bench cannot honour: an argparse error saying why."""

    def __init__(self, option_strings: Sequence[str], dest: str, reason: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        raise argparse.ArgumentError(self, self.reason)


def _key_value(text: str) -> tuple[str, str]:
    """vLLM's KEY=VALUE (--header, --metadata), both sides stripped."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def _json_object(text: str) -> dict[str, object]:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return obj


def _percentile_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names or any(n not in PERCENTILE_METRICS for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(PERCENTILE_METRICS)}")
    return names


def _goodput(text: str) -> str:
    """vLLM's --goodput KEY:MS, KEY one of ttft, tpot, e2el: an SLO of that name."""
    name = text.partition(":")[0].strip().lower()
    if name not in GOODPUT_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: KEY must be one of {', '.join(GOODPUT_NAMES)} "
                                         "(--slo takes ITL criteria)")
    return _slo(text)


def _base_url(text: str) -> str:
    """An http(s) URL; without the scheme aiohttp's error ("NonHttpUrlClientError") came only after the run began."""
    if not text.strip().startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT or https://..., got {text!r}")
    return text.strip()


def _slo(text: str) -> str:
    try:
        parse_slo(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _error(args: argparse.Namespace, msg: str) -> None:
    parser = getattr(args, "_bench_parser", None)
    if parser is not None:
        parser.error(msg)  # exits with status 2
    raise ValueError(msg)
