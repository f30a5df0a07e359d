"""The phase breakdown (phases.py) as a figure (matplotlib Agg, no pyplot): one panel per rate, and
in it one group of stacked bars per series, a bar per role in the order a request meets them —
the proxy (its overhead in and out), each instance role (queue, prefill, decode: disjoint on that
instance's clock), the KV transfer — each labelled with its total."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pdserve.bench.phase_report import PhaseRun
from pdserve.bench.phases import PHASES, Breakdown
from pdserve.bench.plots import save_figure

_STACKS = {"proxy": ("proxy_request", "proxy_response")}  # every other role: _INSTANCE
_INSTANCE = ("queue", "prefill", "decode")
_COLORS = {"proxy_request": "tab:gray", "proxy_response": "0.75", "queue": "tab:orange", "prefill": "tab:blue",
           "decode": "tab:green", "kv_transfer": "tab:purple"}
_SHORT = {"proxy": "proxy", "standalone": "S", "prefill": "P", "decode": "D", "both": "B"}
_LABELS = {p.key: p.label for p in PHASES}


def _bars(b: Breakdown) -> list[tuple[str, list[tuple[str, float]]]]:
    """(bar label, [(phase, mean ms)]) in the order a request meets them; the KV bar before decode."""
    bars = []
    for role in b.roles():
        if role == "decode":
            bars += _kv_bar(b)
        stack = [(k, 1e3 * m) for k in _STACKS.get(role, _INSTANCE) if (m := b.mean_s(role, k)) is not None]
        if stack:
            bars.append((_SHORT.get(role, role), stack))
    if "decode" not in b.roles():
        bars += _kv_bar(b)
    return bars


def _kv_bar(b: Breakdown) -> list[tuple[str, list[tuple[str, float]]]]:
    kv = [m for m in b.means if m.phase == "kv_transfer"]
    count = sum(m.count for m in kv)
    return [("KV", [("kv_transfer", 1e3 * sum(m.total_s for m in kv) / count)])] if count else []


def plot_phases(runs: Sequence[PhaseRun], path: str | Path, title: str = "") -> Path | None:
    """The figure of `runs` (series, rate, breakdown); None when none has a bar to draw."""
    rates = sorted({rate for _, rate, b in runs if _bars(b)})
    if not rates:
        return None
    series = list(dict.fromkeys(name for name, _, _ in runs))
    widest = max(sum(len(_bars(b)) + 1 for name, r, b in runs if r == rate) for rate in rates)
    fig = Figure(figsize=(min(4.0 + 0.55 * widest * len(rates), 30.0), 5.0))
    axes = fig.subplots(1, len(rates), sharey=True, squeeze=False)[0]
    for ax, rate in zip(axes, rates, strict=True):
        ticks, labels, x = [], [], 0.0
        for name in series:
            b = next((b for n, r, b in runs if n == name and r == rate), None)
            bars = _bars(b) if b is not None else []
            if not bars:
                continue
            start = x
            for label, stack in bars:
                bottom = 0.0
                for phase, ms in stack:
                    ax.bar(x, ms, bottom=bottom, width=0.8, color=_COLORS[phase])
                    bottom += ms
                total = f"{bottom:.0f}" if bottom >= 100 else f"{bottom:.3g}"
                ax.annotate(total, (x, bottom), ha="center", va="bottom", fontsize="x-small")
                ticks.append(x)
                labels.append(label)
                x += 1.0
            ax.text((start + x - 1.0) / 2, -0.1, name, transform=ax.get_xaxis_transform(), ha="center", va="top")
            x += 1.0
        ax.set_xticks(ticks, labels, fontsize="small")
        ax.set_title(f"{rate:g} req/s", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean per request (ms)")
    handles = [Patch(color=c, label=_LABELS[k]) for k, c in _COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small")
    fig.suptitle(title or "Where a request's time goes, per role (S standalone, P prefill, D decode, B both)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return save_figure(fig, path, dpi=110, tight=False)
