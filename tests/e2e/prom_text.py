"""A strict reader of Prometheus text exposition 0.0.4 for tests: every family declared once by
`# TYPE` before its samples, sample names and labels well formed, histogram buckets cumulative and
ending at `+Inf` == `_count`. It also runs prometheus_client's parser when that is installed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str
    type: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m is not None, f"bad labels {text!r} at {pos}"
        assert m.group(1) not in out, f"label {m.group(1)} twice in {text!r}"
        out[m.group(1)] = m.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        pos = m.end()
    return out


def _value(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


def parse(text: str) -> dict[str, Family]:
    """Families by their TYPE name (a counter's ends with `_total`)."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert re.fullmatch(_NAME, name) and kind in _TYPES, line
            assert name not in families, f"{name} declared twice"
            current = families[name] = Family(name, kind)
            continue
        if line.startswith("#") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m is not None, f"bad sample line {line!r}"
        name, labels, value = m.group(1), _labels(m.group(2) or ""), _value(m.group(3))
        assert current is not None, f"{name} before any TYPE"
        allowed = {current.name} if current.type != "histogram" else {
            current.name + s for s in ("_bucket", "_sum", "_count")}
        assert name in allowed, f"{name} is not a sample of {current.name} ({current.type})"
        current.samples.append((name, labels, value))
    for fam in families.values():
        if fam.type == "histogram":
            _check_histogram(fam)
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return families
    assert len(list(text_string_to_metric_families(text))) == len(families)
    return families


def _check_histogram(fam: Family) -> None:
    series: dict[Labels, list[tuple[float, float]]] = {}
    counts: dict[Labels, float] = {}
    for name, labels, value in fam.samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if name.endswith("_bucket"):
            series.setdefault(rest, []).append((_value(labels["le"]), value))
        elif name.endswith("_count"):
            counts[rest] = value
    assert series.keys() == counts.keys(), fam.name
    for rest, buckets in series.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{fam.name} buckets {bounds}"
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{fam.name} buckets not cumulative: {values}"
        assert values[-1] == counts[rest], f"{fam.name}: +Inf {values[-1]} != count {counts[rest]}"


def value(families: dict[str, Family], sample: str, **labels: str) -> float:
    """The one sample named `sample` whose labels include `labels` (0 when there is none)."""
    family = families.get(sample) or next(
        (families[sample[: -len(s)]] for s in ("_bucket", "_sum", "_count")
         if sample.endswith(s) and sample[: -len(s)] in families), None)
    if family is None:
        return 0.0
    found = [v for n, lab, v in family.samples if n == sample and labels.items() <= lab.items()]
    assert len(found) <= 1, f"{sample}{labels} matches {len(found)} samples"
    return found[0] if found else 0.0
