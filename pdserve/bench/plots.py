"""PNG plots, drawn on matplotlib's Agg canvas (no pyplot, no display, no global backend switch).

- per-request bars of TTFT and of ITL with the SLO lines, gray for requests missing any SLO
  (the seed article's Figure 3);
- SLO attainment vs request rate, one line per topology (the seed article's Figure 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pdserve.bench.client import RequestRecord
from pdserve.bench.goodput import DEFAULT_TARGET, AttainmentPoint, distserve_goodput
from pdserve.bench.metrics import SLO, is_good

GOOD_COLOR = "tab:blue"
BAD_COLOR = "0.75"
FAILED_COLOR = "tab:red"
_TTFT = SLO("ttft", 0.0, "ttft")  # value extractors when no such SLO was given
_ITL_P99 = SLO("itl_p99", 0.0, "itl_pct", 99.0)


def save_figure(fig: Figure, path: str | Path, dpi: int = 120, tight: bool = True) -> Path:
    """Render `fig` to `path` (PNG; its folder made), cropped to its content when `tight`."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=dpi, bbox_inches="tight" if tight else None)
    return out


def _bars(records: Sequence[RequestRecord], slos: Sequence[SLO], metric: SLO, title: str, path: Path) -> Path:
    """Bars of `metric` per request; the line is drawn when `metric` is one of `slos`."""
    n = len(records)
    fig = Figure(figsize=(min(max(8.0, 0.08 * n), 30.0), 4.0))
    ax = fig.add_subplot()
    good = [is_good(r, slos) for r in records]
    heights = [metric.value_ms(r) or 0.0 for r in records]
    ax.bar(range(n), heights, width=0.85, color=[GOOD_COLOR if g else BAD_COLOR for g in good])
    handles: list[Artist] = [
        Patch(color=GOOD_COLOR, label="meets all SLOs"),
        Patch(color=BAD_COLOR, label="misses an SLO"),
    ]
    failed = [i for i, r in enumerate(records) if not r.success]
    if failed:
        handles.append(ax.scatter(failed, [0.0] * len(failed), marker="x", color=FAILED_COLOR, label="failed"))
    if metric in slos:
        label = f"SLO: {metric.label} <= {metric.threshold_ms:g} ms"
        handles.append(ax.axhline(metric.threshold_ms, color=FAILED_COLOR, ls="--", lw=1.2, label=label))
    ax.set_title(f"{title}: {sum(good)}/{n} requests meet all SLOs")
    ax.set_xlabel("request (in send order)")
    ax.set_ylabel(f"{metric.label} (ms)")
    ax.set_xlim(-1, max(n, 1))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_figure(fig, path)


def plot_per_request(records: Sequence[RequestRecord], slos: Sequence[SLO], out_dir: str | Path) -> list[Path]:
    """`ttft_per_request.png` and `itl_per_request.png` in `out_dir`; returns their paths.

    The ITL bar is each request's own statistic of its gaps: that of the first ITL criterion given
    (e.g. p99 for `itl_p99`, max for `itl_max`), p99 when there is none. Failed requests: a red x.
    """
    out = Path(out_dir)
    ordered = sorted(records, key=lambda r: r.send_time)
    ttft = next((s for s in slos if s.kind == "ttft"), _TTFT)
    itl = next((s for s in slos if s.kind in ("itl_pct", "itl_mean")), _ITL_P99)
    return [
        _bars(ordered, slos, ttft, "TTFT per request", out / "ttft_per_request.png"),
        _bars(ordered, slos, itl, "ITL per request", out / "itl_per_request.png"),
    ]


def plot_attainment_vs_rate(
    series: Mapping[str, Sequence[AttainmentPoint]],
    path: str | Path,
    target: float = DEFAULT_TARGET,
    title: str = "SLO attainment vs request rate",
) -> Path:
    """One line per series (e.g. topology): attainment (%) against offered rate, the target line, and
    a diamond where each curve's DistServe goodput is (also written in its legend entry)."""
    fig = Figure(figsize=(8.0, 5.0))
    ax = fig.add_subplot()
    for name, points in series.items():
        if not points:
            continue
        pts = sorted(points, key=lambda p: p.rate)
        g = distserve_goodput(pts, target)
        bound = "< lowest rate" if g.below_range else (">= " if g.lower_bound else "") + f"{g.rate:.2f} req/s"
        xs, ys = [p.rate for p in pts], [100 * p.attainment for p in pts]
        (line,) = ax.plot(xs, ys, marker="o", label=f"{name} (goodput {bound})")
        if not g.below_range:
            ax.plot([g.rate], [100 * target], marker="D", ms=7, color=line.get_color(), zorder=3)
    ax.axhline(100 * target, color="0.4", ls="--", lw=1, label=f"{target:.0%} target")
    ax.set_ylim(0, 105)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("requests meeting all SLOs (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="small")
    return save_figure(fig, path)
