"""The phase breakdown (phases.py) as a Markdown table: one row per series, rate and role, the mean
milliseconds of each phase; columns no row has are left out."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.bench.phases import PHASES, Breakdown

PhaseRun = tuple[str, float, Breakdown]  # (series, rate, its breakdown)

INTRO = ("Where the time goes (mean ms per request, from each process's /metrics; a decode instance's queue "
         "includes waiting for the KV, and KV transfer is counted where the copy runs):")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def phase_table(runs: Sequence[PhaseRun]) -> str:
    """The table and any skipped processes, or "" when no run has a breakdown."""
    rows = [(name, rate, b, role) for name, rate, b in runs for role in b.roles()]
    skipped = [f"- {name} @ {rate:g} req/s: {note}" for name, rate, b in runs for note in b.skipped]
    if not rows and not skipped:
        return ""
    lines = [INTRO]
    if rows:
        cols = [p for p in PHASES if any(b.get(role, p.key) for _, _, b, role in rows)]
        lines += ["", "| series | req/s | role | requests | " + " | ".join(p.label for p in cols) + " |",
                  "|---" * (len(cols) + 4) + "|"]
        for name, rate, b, role in rows:
            cells = [_ms(b.mean_s(role, p.key)) for p in cols]
            lines.append(f"| {name} | {rate:g} | {role} | {b.requests(role)} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Left out of the breakdown:", *skipped]
    return "\n".join(lines) + "\n"
