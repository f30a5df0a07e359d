"""Instance pickers: round-robin, least-loaded (fewest calls in flight), and prefix affinity.

A picker chooses among candidates the caller already filtered (healthy, of one role, not yet tried
for this request). Round-robin takes the next address after the one it picked last for that role,
in address order, so it stays even when instances come and go; least-loaded breaks ties the same way.

Prefix affinity is cache-aware routing (as SGLang's router does it, approximately): the proxy keeps,
per instance, the chained hashes of the prompt chunks it sent there (prefix_key.py), a model of
that instance's prefix cache. A request goes to the instance whose model shares its longest
leading run of chunks, unless that instance has more than `balance_slack` calls in flight beyond
the least loaded one; with no match it goes to the least loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from pdserve.proxy.instances import Instance, RoleCode
from pdserve.proxy.settings import RoutingPolicy


class Picker(Protocol):
    def pick(self, role: RoleCode, candidates: Sequence[Instance], key: Sequence[bytes] = ()) -> Instance | None:
        """One of `candidates`, or None when there is none. `key`: the request's prompt as chained
        chunk hashes (prefix_key.prompt_key), empty when the caller has none."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._last: dict[RoleCode, str] = {}

    def _next(self, role: RoleCode, candidates: Sequence[Instance]) -> Instance | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda i: i.address)
        last = self._last.get(role)
        chosen = ordered[0]
        if last is not None:
            chosen = next((i for i in ordered if i.address > last), ordered[0])
        self._last[role] = chosen.address
        return chosen

    def pick(self, role: RoleCode, candidates: Sequence[Instance], key: Sequence[bytes] = ()) -> Instance | None:
        return self._next(role, candidates)


class LeastLoaded(RoundRobin):
    def pick(self, role: RoleCode, candidates: Sequence[Instance], key: Sequence[bytes] = ()) -> Instance | None:
        if not candidates:
            return None
        low = min(i.in_flight for i in candidates)
        return self._next(role, [i for i in candidates if i.in_flight == low])


class PrefixAffinity(LeastLoaded):
    def __init__(self, balance_slack: int = 4, max_chunks_per_instance: int = 1 << 18) -> None:
        super().__init__()
        self.balance_slack = balance_slack
        self.max_chunks = max_chunks_per_instance
        # (address, engine_id) -> chunk hashes routed there, least recently used first. A restarted
        # instance has a new engine id (registered ones), so it starts with an empty model.
        self._seen: dict[tuple[str, str], OrderedDict[bytes, None]] = {}

    def pick(self, role: RoleCode, candidates: Sequence[Instance], key: Sequence[bytes] = ()) -> Instance | None:
        if not candidates or not key:
            return super().pick(role, candidates)
        low = min(i.in_flight for i in candidates)
        best, best_len = None, 0
        for inst in sorted(candidates, key=lambda i: i.address):
            if inst.in_flight > low + self.balance_slack:
                continue
            n = self.matched(inst, key)
            if n > best_len:
                best, best_len = inst, n
        chosen = best if best is not None else super().pick(role, candidates)
        if chosen is not None:
            self._record(chosen, key)
        return chosen

    def matched(self, inst: Instance, key: Sequence[bytes]) -> int:
        """How many leading chunks of `key` were sent to `inst` before."""
        seen = self._seen.get((inst.address, inst.engine_id))
        if not seen:
            return 0
        n = 0
        for h in key:
            if h not in seen:
                break
            n += 1
        return n

    def _record(self, inst: Instance, key: Sequence[bytes]) -> None:
        seen = self._seen.setdefault((inst.address, inst.engine_id), OrderedDict())
        for h in reversed(key):  # the first chunk most recent: a prefix outlives its tails
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_chunks:
            seen.popitem(last=False)


def make_picker(policy: RoutingPolicy) -> Picker:
    if policy == "round-robin":
        return RoundRobin()
    if policy == "least-loaded":
        return LeastLoaded()
    if policy == "prefix":
        return PrefixAffinity()
    raise ValueError(f"unknown routing policy {policy!r}")
