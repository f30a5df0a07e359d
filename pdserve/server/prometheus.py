"""A minimal Prometheus registry: counters, callback gauges, histograms, text exposition 0.0.4.

Each app owns one `Registry` (no process globals), so several apps in one process (tests) never
share counts. Updates happen on one thread per metric (the event loop's, or the engine's for a
per-step histogram) and rendering reads without locks: a histogram's `_count` is its buckets' total,
so a scrape racing an update never shows an inconsistent `+Inf` bucket.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LabelValues = tuple[str, ...]
ConstLabels = Sequence[tuple[str, str]]  # (name, value) pairs on every sample of a metric, first


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "", const: str = "") -> str:
    parts = [const] if const else []
    parts += [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _const(labels: ConstLabels) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in labels)


class _Metric:
    kind = ""

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str] = (), const_labels: ConstLabels = ()
    ) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self.const = _const(const_labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """Monotonic count, optionally split by labels."""

    kind = "counter"

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str] = (), const_labels: ConstLabels = ()
    ) -> None:
        super().__init__(name, help_text, label_names, const_labels)
        self._values: dict[LabelValues, float] = {} if label_names else {(): 0.0}

    def inc(self, amount: float = 1.0, labels: LabelValues = ()) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, labels: LabelValues = ()) -> float:
        return self._values.get(labels, 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k, const=self.const)} {_num(v)}"
                for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    """A value read from a callback at scrape time (e.g. the engine's live stats)."""

    kind = "gauge"

    def __init__(
        self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge", const_labels: ConstLabels = ()
    ) -> None:
        super().__init__(name, help_text, const_labels=const_labels)
        self._read = read
        self.kind = kind  # "counter" for a monotonic value kept elsewhere

    def samples(self) -> list[str]:
        labels = "{" + self.const + "}" if self.const else ""
        return [f"{self.name}{labels} {_num(self._read())}"]


class LabeledGauge(_Metric):
    """Labelled samples read from a callback at scrape time: `read()` -> [(label values, value)]
    (an info metric: a gauge of 1 whose labels carry the information)."""

    kind = "gauge"

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str],
        read: Callable[[], list[tuple[LabelValues, float]]],
    ) -> None:
        super().__init__(name, help_text, label_names)
        self._rows = read

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in self._rows()]


class Histogram(_Metric):
    """Cumulative buckets (upper bounds, +Inf added), _sum and _count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], const_labels: ConstLabels = ()) -> None:
        super().__init__(name, help_text, const_labels=const_labels)
        self.bounds = sorted(b for b in buckets if not math.isinf(b))
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self._counts)

    def observe(self, value: float, times: int = 1) -> None:
        """Record `value` (`times` times: one call for several equal samples)."""
        self._counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def samples(self, name: str | None = None) -> list[str]:
        name = name or self.name
        prefix = self.const + "," if self.const else ""
        labels = "{" + self.const + "}" if self.const else ""
        out, running = [], 0
        for bound, n in zip([*self.bounds, math.inf], list(self._counts), strict=True):
            running += n
            out.append(f'{name}_bucket{{{prefix}le="{_num(bound)}"}} {running}')
        out.append(f"{name}_sum{labels} {_num(self.sum)}")
        out.append(f"{name}_count{labels} {running}")
        return out


class Alias(_Metric):
    """Another histogram's samples under a second name (a deprecated name kept for old dashboards)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, of: Histogram) -> None:
        super().__init__(name, help_text)
        self._of = of

    def samples(self) -> list[str]:
        return self._of.samples(self.name)


M = TypeVar("M", bound=_Metric)


class Registry:
    """The metrics of one app, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines += m.header() + m.samples()
        return "\n".join(lines) + "\n"
