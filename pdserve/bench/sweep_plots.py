"""The sweep's figures (matplotlib Agg, no pyplot), as in the seed article:

- Figure 3: per-request bars of TTFT and of ITL (the request's own p99 gap, or whatever ITL
  criterion the headline set uses) at the headline rate, one row of panels per series, SLO lines
  dashed, gray bars for requests missing any headline criterion;
- Figure 4: attainment vs request rate, one line per series (one file per SLO set).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pdserve.bench.metrics import SLO
from pdserve.bench.plots import BAD_COLOR, FAILED_COLOR, GOOD_COLOR, plot_attainment_vs_rate, save_figure
from pdserve.bench.sweep import Series, SweepConfig
from pdserve.bench.sweep_report import SeriesSummary

_TTFT = SLO("ttft", 0.0, "ttft")
_ITL_P99 = SLO("itl_p99", 0.0, "itl_pct", 99.0)


def plot_fig3(cfg: SweepConfig, series: Sequence[Series], path: str | Path) -> Path | None:
    """Per-request TTFT and ITL bars at the headline rate; None when no series has that rate."""
    rate, slos = cfg.chosen_headline_rate, cfg.headline.slos
    rows = [(s.name, p) for s in series if (p := s.at(rate)) is not None and p.records]
    if not rows:
        return None
    metrics = (next((s for s in slos if s.kind == "ttft"), _TTFT),
               next((s for s in slos if s.kind in ("itl_pct", "itl_mean", "tpot")), _ITL_P99))
    fig = Figure(figsize=(14.0, 2.6 * len(rows) + 0.8))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (name, point), ax_row in zip(rows, axes, strict=True):
        recs = sorted(point.records, key=lambda r: r.send_time)
        good = [r.success and all(s.met(r) for s in slos) for r in recs]
        for metric, ax in zip(metrics, ax_row, strict=True):
            heights = [metric.value_ms(r) or 0.0 for r in recs]
            ax.bar(range(len(recs)), heights, width=0.85, color=[GOOD_COLOR if g else BAD_COLOR for g in good])
            failed = [i for i, r in enumerate(recs) if not r.success]
            if failed:
                ax.scatter(failed, [0.0] * len(failed), marker="x", color=FAILED_COLOR)
            if metric in slos:
                ax.axhline(metric.threshold_ms, color=FAILED_COLOR, ls="--", lw=1.2)
                ax.set_ylim(0, max(2.5 * metric.threshold_ms, 1.05 * max(heights, default=0.0)))
            ax.set_xlim(-1, max(len(recs), 1))
            ax.set_ylabel(f"{metric.label} (ms)")
            ax.set_title(f"{name}: {sum(good)}/{len(recs)} meet both SLOs", fontsize="medium")
    for ax in axes[-1]:
        ax.set_xlabel("request (in send order)")
    handles = [Patch(color=GOOD_COLOR, label="meets all SLOs"), Patch(color=BAD_COLOR, label="misses an SLO")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize="small")
    fig.suptitle(f"Per-request TTFT and ITL at {rate:g} req/s ({cfg.headline.describe()})")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return save_figure(fig, path, dpi=110, tight=False)


def plot_fig4(cfg: SweepConfig, summaries: Sequence[SeriesSummary], out_dir: str | Path) -> list[Path]:
    """`fig4_attainment.png` for the headline set, `fig4_attainment_<set>.png` for the others."""
    paths = []
    for s in cfg.slo_sets:
        series = {m.name: m.curve(s.name) for m in summaries if m.curve(s.name)}
        if not series:
            continue
        stem = "fig4_attainment" if s.name == cfg.headline_set else f"fig4_attainment_{s.name}"
        title = f"SLO attainment vs request rate: {s.describe()}"
        paths.append(plot_attainment_vs_rate(series, Path(out_dir) / f"{stem}.png", title=title))
    return paths
