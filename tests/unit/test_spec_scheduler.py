"""Speculative rows in the scheduler, without a model: budget, lookahead blocks, rollback, stops."""

from __future__ import annotations

from pdserve.config import SchedulerConfig
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler


def make(num_blocks: int = 16, budget: int = 32, prefix_caching: bool = True) -> tuple[Scheduler, BlockPool]:
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), pool, 4, prefix_caching=prefix_caching), pool


def decoding(s: Scheduler, rid: str, n_prompt: int = 6, **sp) -> Request:
    """A request past its prefill: its first token sampled, every token but that one computed."""
    r = Request(rid, list(range(n_prompt)), SamplingParams(**{"max_tokens": 20, **sp}))
    s.add(r)
    while not r.output_token_ids:
        b = s.schedule()
        s.update_after_step(b, {x.request_id: 100 for x in b.decodes + [x for x, _ in b.prefills]})
    assert r.num_computed_tokens == r.num_tokens - 1 == n_prompt
    return r


def test_a_row_of_drafts_takes_budget_and_lookahead_blocks_and_rolls_back():
    s, pool = make()
    r = decoding(s, "a")  # 7 tokens in 2 blocks of 4
    b = s.schedule({"a": [1, 2, 3, 4]})
    assert b.decodes == [] and b.prefills == [(r, 5)] and b.spec == {"a": [1, 2, 3, 4]} and b.num_tokens == 5
    assert len(r.block_ids) == 3  # slots 6..10
    advanced = s.update_after_step(b, {"a": 9}, {"a": [1, 2]})  # two accepted, then the target's 9
    assert advanced == [(r, 3)] and r.output_token_ids == [100, 1, 2, 9]
    assert r.num_computed_tokens == 9 == r.num_tokens - 1  # the rejected slots 9, 10 are written over later
    assert len(r.block_ids) == 3 and pool.is_cached(r.block_ids[1]) and not pool.is_cached(r.block_ids[2])
    s.check_integrity()
    b = s.schedule({"a": [5, 6]})  # slots 9..11: the kept lookahead block serves them
    assert b.prefills == [(r, 3)] and len(r.block_ids) == 3
    s.update_after_step(b, {"a": 8}, {"a": [5, 6]})
    assert r.output_token_ids == [100, 1, 2, 9, 5, 6, 8] and r.num_computed_tokens == 12
    s.check_integrity()


def test_drafts_are_trimmed_to_the_budget_and_dropped_without_free_blocks():
    s, _ = make(budget=4)
    r = decoding(s, "a")
    b = s.schedule({"a": [1, 2, 3, 4, 5]})
    assert b.spec == {"a": [1, 2, 3]} and b.prefills == [(r, 4)] and b.num_tokens == 4
    s.update_after_step(b, {"a": 9}, {"a": []})
    s.check_integrity()
    full, pool = make(num_blocks=2)
    q = decoding(full, "q")
    b = full.schedule({"q": [1, 2, 3]})  # no block for the drafts' slots: a plain decode, no preemption
    assert b.decodes == [q] and b.spec == {} and b.preempted == []
    full.update_after_step(b, {"q": 9})
    assert q.output_token_ids == [100, 9] and pool.num_free == 0


def test_a_stop_inside_the_row_ends_the_request_there():
    s, pool = make()
    r = decoding(s, "a", stop_token_ids=[2])
    b = s.schedule({"a": [1, 2, 3]})
    assert s.update_after_step(b, {"a": 4}, {"a": [1, 2, 3]}) == [(r, 2)]
    assert r.output_token_ids == [100, 1, 2] and r.status == RequestStatus.FINISHED_STOPPED
    short = decoding(s, "b", max_tokens=3)
    b = s.schedule({"b": [7]})
    assert s.update_after_step(b, {"b": 8}, {"b": [7]}) == [(short, 2)]
    assert short.status == RequestStatus.FINISHED_LENGTH and short.output_token_ids == [100, 7, 8]
    s.check_integrity()
    assert pool.num_free == pool.num_blocks


def test_a_preempted_row_leaves_the_batch():
    s, pool = make(num_blocks=5, budget=64)
    s.config = SchedulerConfig(max_num_batched_tokens=64, policy="priority")
    s.by_priority = True
    low = decoding(s, "low")  # 2 blocks
    b = s.schedule({"low": [1, 2, 3]})  # 3 blocks now
    assert b.spec == {"low": [1, 2, 3]}
    s.update_after_step(b, {"low": 5}, {"low": [1, 2, 3]})
    high = Request("high", list(range(50, 60)), SamplingParams(max_tokens=4), priority=-1)
    s.add(high)
    b = s.schedule({"low": [9]})  # high needs 3 blocks: low, ranked after it, is preempted
    assert b.preempted == [low] and "low" not in b.spec and all(r is not low for r, _ in b.prefills)
    s.update_after_step(b, {"high": 1})
    s.check_integrity()
