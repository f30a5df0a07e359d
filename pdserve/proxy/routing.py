"""Instance pickers: round-robin and least-loaded (fewest calls in flight).

A picker chooses among candidates the caller already filtered (healthy, of one role, not yet tried
for this request). Round-robin takes the next address after the one it picked last for that role,
in address order, so it stays even when instances come and go; least-loaded breaks ties the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pdserve.proxy.instances import Instance, RoleCode
from pdserve.proxy.settings import RoutingPolicy


class Picker(Protocol):
    def pick(self, role: RoleCode, candidates: Sequence[Instance]) -> Instance | None:
        """One of `candidates`, or None when there is none."""
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

    def pick(self, role: RoleCode, candidates: Sequence[Instance]) -> Instance | None:
        return self._next(role, candidates)


class LeastLoaded(RoundRobin):
    def pick(self, role: RoleCode, candidates: Sequence[Instance]) -> Instance | None:
        if not candidates:
            return None
        low = min(i.in_flight for i in candidates)
        return self._next(role, [i for i in candidates if i.in_flight == low])


def make_picker(policy: RoutingPolicy) -> Picker:
    if policy == "round-robin":
        return RoundRobin()
    if policy == "least-loaded":
        return LeastLoaded()
    raise ValueError(f"unknown routing policy {policy!r}")
