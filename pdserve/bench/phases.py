"""Where a request's time goes, per role: the mean seconds of each phase, from the histograms every
pdserve process exports on /metrics, scraped just before a run's timed requests and just after.

A phase is one histogram; its mean over a run is (sum after - sum before) / (count after - count
before), summed over every process of a role (and every label set). The phases (vLLM's meanings,
server/vllm_metrics.py):

- proxy: `request overhead` (arrival -> first upstream request sent), `response overhead`
  (upstream first byte -> first byte to the client);
- each instance role (standalone, prefill, decode, both): `queue` (in the engine until first
  scheduled; on a decode instance that includes waiting for the KV), `prefill` (first scheduled ->
  first token; on a decode instance the recomputed last prompt token), `decode` (first -> last
  token), `KV transfer` (recorded where the copy runs: decode in read mode, prefill in write mode)
  and the server-side `TTFT` (arrival at that instance -> its first token).

A process whose counts went back during the run (restarted) has that phase skipped, with a note;
so has one that could not be scraped. A histogram missing before the run counts from zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp

Totals = Mapping[str, tuple[float, float]]  # histogram family -> (sum, count) over all its label sets
ROLE_ORDER = ("proxy", "standalone", "prefill", "both", "decode")


@dataclass(frozen=True)
class Phase:
    """One phase: the histogram whose per-request mean it is."""

    key: str  # the JSON key
    label: str  # column header
    metric: str  # the histogram family


PHASES = (
    Phase("proxy_request", "proxy in", "pdserve_proxy_request_overhead_seconds"),
    Phase("proxy_response", "proxy out", "pdserve_proxy_response_overhead_seconds"),
    Phase("queue", "queue", "vllm:request_queue_time_seconds"),
    Phase("prefill", "prefill", "vllm:request_prefill_time_seconds"),
    Phase("kv_transfer", "KV transfer", "pdserve_kv_transfer_seconds"),
    Phase("decode", "decode", "vllm:request_decode_time_seconds"),
    Phase("ttft", "server TTFT", "vllm:time_to_first_token_seconds"),
)
PHASE_KEYS = tuple(p.key for p in PHASES)


@dataclass(frozen=True)
class Target:
    """One /metrics endpoint: the proxy or an instance, and its role."""

    name: str
    role: str  # "proxy", "standalone", "prefill", "decode" or "both"
    url: str


@dataclass(frozen=True)
class Scrape:
    """One target's histogram totals at one moment; `totals` None when it could not be read."""

    target: Target
    totals: Totals | None
    error: str = ""


@dataclass(frozen=True)
class PhaseMean:
    """One phase of one role over a run: observations and their total seconds."""

    role: str
    phase: str
    total_s: float
    count: int

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count


@dataclass(frozen=True)
class Breakdown:
    """A run's phases, per role (only those observed at least once), and what was skipped."""

    means: tuple[PhaseMean, ...]
    instances: tuple[tuple[str, int], ...]  # role -> processes scraped
    skipped: tuple[str, ...] = ()

    @classmethod
    def of(cls, means: Sequence[PhaseMean], instances: Mapping[str, int], skipped: Sequence[str] = ()) -> Breakdown:
        """In one order: roles as a request meets them, phases as PHASES lists them."""
        phase_rank = {k: i for i, k in enumerate(PHASE_KEYS)}
        ordered = sorted(means, key=lambda m: (_role_rank(m.role), phase_rank.get(m.phase, len(phase_rank)), m.phase))
        return cls(tuple(ordered), tuple(sorted(instances.items(), key=lambda kv: _role_rank(kv[0]))), tuple(skipped))

    def roles(self) -> tuple[str, ...]:
        """Roles with an observed phase, in the order a request meets them."""
        return tuple(dict.fromkeys(m.role for m in self.means))

    def get(self, role: str, phase: str) -> PhaseMean | None:
        return next((m for m in self.means if m.role == role and m.phase == phase), None)

    def mean_s(self, role: str, phase: str) -> float | None:
        m = self.get(role, phase)
        return m.mean_s if m is not None else None

    def requests(self, role: str) -> int:
        """Requests that role finished in the run: its most observed phase's count."""
        return max((m.count for m in self.means if m.role == role), default=0)

    def to_json(self) -> dict[str, object]:
        roles: dict[str, object] = {}
        for role in self.roles():
            phases = {m.phase: {"mean_s": m.mean_s, "count": m.count, "sum_s": m.total_s}
                      for m in self.means if m.role == role}
            roles[role] = {"instances": dict(self.instances).get(role, 0), "phases": phases}
        return {"roles": roles, "skipped": list(self.skipped)}

    @classmethod
    def from_json(cls, data: Mapping) -> Breakdown:
        """What `to_json` wrote (results.json)."""
        roles = data.get("roles") or {}
        means = [PhaseMean(role, phase, float(v["sum_s"]), int(v["count"]))
                 for role, r in roles.items() for phase, v in r["phases"].items()]
        instances = {role: int(r.get("instances", 0)) for role, r in roles.items()}
        return cls.of(means, instances, data.get("skipped") or ())


def _role_rank(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), role)


def histogram_totals(text: str) -> dict[str, tuple[float, float]]:
    """Prometheus text -> every histogram family's (sum, count), added over its label sets.
    ValueError on text that does not parse."""
    out: dict[str, tuple[float, float]] = {}
    # Imported here: pdserve.bench (pd_direct, local_servers) must import without it (the GPU image).
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        total = count = 0.0
        for s in family.samples:
            if s.name == family.name + "_sum":
                total += s.value
            elif s.name == family.name + "_count":
                count += s.value
        out[family.name] = (total, count)
    return out


def _delta(before: Totals, after: Totals, metric: str) -> tuple[float, float] | str | None:
    """(seconds, count) observed between the scrapes; a reason to skip; None if never exported."""
    if metric not in after:
        return None if metric not in before else "gone from /metrics"
    s0, c0 = before.get(metric, (0.0, 0.0))
    s1, c1 = after[metric]
    if c1 < c0 or s1 < s0 - 1e-9:
        return "counts went back (restarted?)"
    return s1 - s0, c1 - c0


def breakdown(before: Sequence[Scrape], after: Sequence[Scrape]) -> Breakdown:
    """The per-role phase means between two scrapes of the same targets."""
    ends = {a.target: a for a in after}
    sums: dict[tuple[str, str], tuple[float, float]] = {}
    instances: dict[str, int] = {}
    skipped: list[str] = []
    for b in before:
        a = ends.get(b.target)
        if b.totals is None or a is None or a.totals is None:
            why = b.error or (a.error if a is not None else "") or "not scraped after the run"
            skipped.append(f"{b.target.name} ({b.target.role}): {why}")
            continue
        instances[b.target.role] = instances.get(b.target.role, 0) + 1
        for phase in PHASES:
            d = _delta(b.totals, a.totals, phase.metric)
            if isinstance(d, str):
                skipped.append(f"{b.target.name} ({b.target.role}) {phase.label}: {d}")
            elif d is not None:
                s, c = sums.get((b.target.role, phase.key), (0.0, 0.0))
                sums[(b.target.role, phase.key)] = (s + d[0], c + d[1])
    means = [PhaseMean(role, key, s, int(c)) for (role, key), (s, c) in sums.items() if c > 0]
    return Breakdown.of(means, instances, skipped)


async def scrape(session: aiohttp.ClientSession, targets: Sequence[Target],
                 timeout_s: float = 5.0) -> tuple[Scrape, ...]:
    """Every target's /metrics at once; one that fails is a Scrape with its error, never raised."""

    async def one(t: Target) -> Scrape:
        try:
            async with session.get(t.url.rstrip("/") + "/metrics",
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status != 200:
                    return Scrape(t, None, f"GET /metrics: HTTP {r.status}")
                return Scrape(t, histogram_totals(await r.text()))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            return Scrape(t, None, f"GET /metrics: {type(e).__name__}: {e}")

    return tuple(await asyncio.gather(*(one(t) for t in targets)))


async def discover(session: aiohttp.ClientSession, base_url: str, timeout_s: float = 5.0) -> tuple[Target, ...]:
    """The proxy at `base_url` and its instances (its GET /instances); () when `base_url` is not a
    pdserve proxy (no such route, or another shape)."""
    try:
        async with session.get(base_url.rstrip("/") + "/instances",
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            rows = await r.json(content_type=None) if r.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return ()
    if not isinstance(rows, list) or not all(isinstance(x, dict) and {"url", "role"} <= x.keys() for x in rows):
        return ()
    found = tuple(Target(str(x.get("address") or x["url"]), str(x["role"]), str(x["url"])) for x in rows)
    return (Target("proxy", "proxy", base_url), *found)


class PhaseProbe:
    """Scrapes its targets when a run's timed requests start and after they have all ended.
    Built with no targets (`PhaseProbe.of_proxy`), it asks the base URL's /instances at the start
    and does nothing when that is not a pdserve proxy."""

    def __init__(self, targets: Sequence[Target] = (), discover_from: str | None = None) -> None:
        self.targets = tuple(targets)
        self.discover_from = discover_from
        self._before: tuple[Scrape, ...] | None = None

    @classmethod
    def of_proxy(cls, base_url: str) -> PhaseProbe:
        return cls(discover_from=base_url)

    async def start(self, session: aiohttp.ClientSession) -> None:
        if self.discover_from is not None and not self.targets:
            self.targets = await discover(session, self.discover_from)
        self._before = await scrape(session, self.targets) if self.targets else None

    async def finish(self, session: aiohttp.ClientSession) -> Breakdown | None:
        """The breakdown since `start`; None when there was nothing to scrape."""
        if self._before is None:
            return None
        return breakdown(self._before, await scrape(session, self.targets))
