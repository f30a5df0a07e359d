"""Admission control: drain, duplicate ids, queue limit."""

from __future__ import annotations

import pytest

from pdserve.server.admission import Admission
from pdserve.server.errors import APIError


def status_of(adm: Admission, rid: str) -> int:
    with pytest.raises(APIError) as e:
        adm.admit(rid)
    return e.value.status


def test_capacity_and_duplicates() -> None:
    adm = Admission(max_num_seqs=2, max_queued=1)
    for rid in ("a", "b", "c"):
        adm.admit(rid)
    assert status_of(adm, "d") == 429
    adm.release("a")
    assert status_of(adm, "b") == 409
    adm.admit("a")  # an id is reusable once released
    assert adm.num_in_flight == 3


def test_429_has_retry_after_and_drain_is_503() -> None:
    adm = Admission(max_num_seqs=1, max_queued=0)
    adm.admit("a")
    with pytest.raises(APIError) as e:
        adm.admit("b")
    assert int(e.value.headers["Retry-After"]) >= 1
    adm.draining = True
    assert status_of(adm, "c") == 503


def test_unlimited_queue() -> None:
    adm = Admission(max_num_seqs=1, max_queued=None)
    for i in range(1000):
        adm.admit(str(i))
    assert adm.num_in_flight == 1000
