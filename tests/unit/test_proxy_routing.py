"""Instance pickers: round-robin and least-loaded."""

from __future__ import annotations

from collections import Counter

import pytest

from pdserve.proxy.instances import Instance, Lease
from pdserve.proxy.routing import LeastLoaded, RoundRobin, make_picker


def _inst(port: int, in_flight: int = 0) -> Instance:
    inst = Instance(address=f"127.0.0.1:{port}", role="D", static=True, healthy=True)
    for _ in range(in_flight):
        inst.leases.add(Lease(inst))
    return inst


def test_round_robin_spreads_evenly() -> None:
    pool = [_inst(8001), _inst(8002), _inst(8003)]
    rr = RoundRobin()
    picks = [rr.pick("D", pool).address for _ in range(9)]  # type: ignore[union-attr]
    assert Counter(picks) == {i.address: 3 for i in pool}
    assert picks[:3] == [i.address for i in pool]


def test_round_robin_survives_membership_changes() -> None:
    a, b, c = _inst(8001), _inst(8002), _inst(8003)
    rr = RoundRobin()
    assert rr.pick("D", [a, b, c]) is a
    assert rr.pick("D", [a, c]) is c  # b left: next after a is c
    assert rr.pick("D", [a, b, c]) is a  # wraps around
    assert rr.pick("D", [b]) is b


def test_round_robin_roles_are_independent() -> None:
    a, b = _inst(8001), _inst(8002)
    rr = RoundRobin()
    assert rr.pick("P", [a, b]) is a
    assert rr.pick("D", [a, b]) is a
    assert rr.pick("P", [a, b]) is b


def test_empty_candidates() -> None:
    assert RoundRobin().pick("D", []) is None
    assert LeastLoaded().pick("D", []) is None


def test_least_loaded_prefers_fewest_in_flight() -> None:
    a, b, c = _inst(8001, 3), _inst(8002, 1), _inst(8003, 2)
    ll = LeastLoaded()
    assert ll.pick("D", [a, b, c]) is b
    b.leases.update(Lease(b) for _ in range(5))
    assert ll.pick("D", [a, b, c]) is c


def test_least_loaded_breaks_ties_round_robin() -> None:
    a, b = _inst(8001), _inst(8002)
    ll = LeastLoaded()
    assert [ll.pick("D", [a, b]) for _ in range(4)] == [a, b, a, b]


def test_exclusion_is_the_callers_filter() -> None:
    a, b = _inst(8001), _inst(8002)
    rr = RoundRobin()
    tried = {a.address}
    assert rr.pick("D", [i for i in (a, b) if i.address not in tried]) is b


def test_make_picker() -> None:
    assert isinstance(make_picker("round-robin"), RoundRobin)
    assert isinstance(make_picker("least-loaded"), LeastLoaded)
    with pytest.raises(ValueError):
        make_picker("random")  # type: ignore[arg-type]
