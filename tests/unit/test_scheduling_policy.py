"""The scheduling policy (fcfs, priority) driven without a model: queue order, ties, the preemption
victim, a waiting request that preempts, remote KV and prefix caching under priority."""

from __future__ import annotations

import random

import pytest

from pdserve.config import SchedulerConfig
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch, Scheduler
from tests.unit.test_scheduler import FakeConnector, run


def make(policy: str = "priority", num_blocks=64, block_size=4, budget=64, max_seqs=8, caching=False):
    pool = BlockPool(num_blocks)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, policy=policy)  # type: ignore[arg-type]
    return Scheduler(cfg, pool, block_size, prefix_caching=caching), pool


def req(rid, n_prompt, max_tokens=4, priority=0, arrival=None, first_token=0, **kw):
    r = Request(rid, list(range(first_token, first_token + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                priority=priority)
    if arrival is not None:
        r.arrival_time = arrival
    return r


def step(s: Scheduler, token: int = 7) -> ScheduledBatch:
    b = s.schedule()
    s.update_after_step(b, {r.request_id: token for r in b.decodes + [r for r, _ in b.prefills]})
    s.check_integrity()
    return b


def ids(batch: ScheduledBatch) -> list[str]:
    return [r.request_id for r in batch.decodes] + [r.request_id for r, _ in batch.prefills]


def admission_order(s: Scheduler) -> list[str]:
    """Run to completion one request at a time (max_num_seqs=1): the order they ran in."""
    order: list[str] = []
    while s.num_unfinished:
        for rid in ids(step(s)):
            if rid not in order:
                order.append(rid)
    return order


def test_priority_orders_the_waiting_queue_lower_first():
    s, pool = make(max_seqs=1)
    for rid, prio in [("a", 5), ("b", 1), ("c", 1), ("d", -3), ("e", 0)]:
        s.add(req(rid, 6, priority=prio))
    assert admission_order(s) == ["d", "e", "b", "c", "a"]
    assert pool.num_free == pool.num_blocks


def test_fcfs_ignores_priority_and_is_unchanged():
    """fcfs serves by arrival whatever the priorities, and schedules exactly as with none."""
    def trace(with_priorities: bool) -> list[tuple[list[str], list[str]]]:
        s, _ = make("fcfs", num_blocks=10, budget=12, max_seqs=3)
        rng, prios = random.Random(1), random.Random(2)
        out = []
        for i in range(40):
            if i < 12:
                s.add(req(f"r{i}", rng.randint(2, 9), max_tokens=rng.randint(1, 8),
                          priority=prios.randint(-5, 5) if with_priorities else 0))
            b = step(s)
            out.append((ids(b), [r.request_id for r in b.preempted]))
        return out

    assert trace(True) == trace(False)
    s, _ = make("fcfs", max_seqs=1)
    for rid, prio in [("a", 5), ("b", 1), ("c", -3)]:
        s.add(req(rid, 6, priority=prio))
    assert admission_order(s) == ["a", "b", "c"]


def test_ties_go_by_arrival_then_by_add_order():
    s, _ = make(max_seqs=1)
    s.add(req("late", 4, arrival=20.0))
    s.add(req("early", 4, arrival=10.0))
    s.add(req("same1", 4, arrival=15.0))
    s.add(req("same2", 4, arrival=15.0))
    s.add(req("urgent", 4, priority=-1, arrival=99.0))
    assert admission_order(s) == ["urgent", "early", "same1", "same2", "late"]


@pytest.mark.parametrize("policy, victim", [("fcfs", "high"), ("priority", "low")])
def test_running_victim_is_the_newest_under_fcfs_and_the_worst_ranked_under_priority(policy, victim):
    # 6 blocks of 4: two 8-token prompts take 4; growing to 12 tokens each needs 6 -> one is preempted.
    s, pool = make(policy, num_blocks=6, block_size=4)
    low, high = req("low", 8, max_tokens=12, priority=2), req("high", 8, max_tokens=12, priority=0)
    s.add(low)
    s.add(high)  # arrives second: fcfs's newest, priority's best
    preempted: list[str] = []
    while s.num_unfinished:
        preempted += [r.request_id for r in step(s).preempted]
    assert preempted and set(preempted) == {victim}
    assert len(low.output_token_ids) == len(high.output_token_ids) == 12
    assert pool.num_free == pool.num_blocks


def test_a_waiting_request_preempts_the_worst_running_one_when_the_cache_is_full():
    s, pool = make(num_blocks=8, block_size=4)
    running = [req(f"low{i}", 5, max_tokens=20, priority=3) for i in range(4)]  # 2 blocks each: all 8
    for r in running:
        s.add(r)
    step(s)
    assert pool.num_free == 0 and len(s.running) == 4
    s.add(req("meh", 4, priority=3))  # ranks after every running one: waits, preempts nobody
    b = step(s)
    assert not b.preempted and "meh" not in ids(b) and s.requests["meh"].status == RequestStatus.WAITING
    urgent = req("urgent", 12, max_tokens=2, priority=0)  # needs 3 blocks: two requests must go
    s.add(urgent)
    b = s.schedule()
    # low3 then low2 (worst first: latest arrival of the worst priority); the batch lost their decodes.
    assert [r.request_id for r in b.preempted] == ["low3", "low2"]
    assert ids(b) == ["low0", "low1", "urgent"]
    assert urgent.status == RequestStatus.RUNNING and all(r.status == RequestStatus.PREEMPTED for r in running[2:])
    s.update_after_step(b, {r: 7 for r in ids(b)})
    s.check_integrity()
    order = []
    while s.num_unfinished:
        for r in step(s).decodes:
            if r.is_finished and r.request_id not in order:
                order.append(r.request_id)
    assert order[0] == "urgent"
    assert pool.num_free == pool.num_blocks


def test_no_preemption_when_the_victims_would_not_free_enough():
    s, pool = make(num_blocks=8, block_size=4)
    better = req("better", 16, max_tokens=40, priority=0)  # 4 blocks (then 5)
    worse = req("worse", 8, max_tokens=40, priority=5)  # 2 blocks
    s.add(better)
    s.add(worse)
    step(s)
    assert pool.num_free == 2
    mid = req("mid", 16, priority=1)  # needs 5 blocks: the free 2 and worse's 2 are not enough
    s.add(mid)
    b = step(s)
    assert not b.preempted and ids(b) == ["better", "worse"]
    assert mid.status == RequestStatus.WAITING and not mid.block_ids


def test_victims_count_shared_prefix_blocks_once_every_holder_lets_go():
    """Two running requests share a cached 2-block prefix: preempting one frees only its own blocks."""
    s, pool = make(num_blocks=10, block_size=4, caching=True)
    a = req("a", 12, max_tokens=20, priority=5)  # 3 blocks (then a 4th)
    s.add(a)
    step(s)
    b_ = req("b", 12, max_tokens=20, priority=5)  # the same prompt: 2 cached blocks, 1 + 1 of its own
    s.add(b_)
    step(s)
    shared = set(a.block_ids) & set(b_.block_ids)
    assert len(shared) == 2 and len(a.block_ids) == 4 and len(b_.block_ids) == 3 and pool.num_free == 5
    # The worst (b) frees its 1 own block (the shared ones stay with a): 6. Then a: its 2 own and
    # the 2 shared, 10.
    need6 = req("need6", 24, priority=0, first_token=100)
    assert s._victims_for(need6, 24, set()) == [b_]
    assert s._victims_for(need6, 24, {id(b_)}) == [a]  # spared: admitted in this step
    need7 = req("need7", 28, priority=0, first_token=100)
    assert s._victims_for(need7, 28, set()) == [b_, a]
    need11 = req("need11", 44, priority=0, first_token=100)
    assert s._victims_for(need11, 44, set()) is None
    assert s._victims_for(req("worse", 28, priority=6, first_token=100), 28, set()) is None
    s.add(need7)
    batch = step(s)
    assert {r.request_id for r in batch.preempted} == {"a", "b"} and ids(batch) == ["need7"]
    run(s)
    assert pool.num_free == pool.num_blocks


def test_step_one_victims_are_not_readmitted_in_the_same_step():
    s, pool = make(num_blocks=6, block_size=4)
    a = req("a", 8, max_tokens=12, priority=0)
    b_ = req("b", 8, max_tokens=12, priority=1)
    s.add(a)
    s.add(b_)
    for _ in range(20):
        batch = step(s)
        for victim in batch.preempted:
            assert victim.request_id not in ids(batch)
        if not s.num_unfinished:
            break
    run(s)
    assert pool.num_free == pool.num_blocks


def test_waiting_for_remote_kv_is_never_a_victim_and_ready_ones_run():
    s, pool = make(num_blocks=8, block_size=4)
    conn = FakeConnector()
    s.connector = conn
    remote = req("remote", 8, max_tokens=3, priority=9)
    remote.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    s.add(remote)
    assert s.allocate_for_remote(remote)  # 2 blocks
    local = req("local", 16, max_tokens=3, priority=9)  # 4 blocks (then 5)
    s.add(local)
    step(s)
    urgent = req("urgent", 8, max_tokens=2, priority=0)  # 3 blocks: local (running) is the victim
    s.add(urgent)
    b = step(s)
    assert [r.request_id for r in b.preempted] == ["local"] and "urgent" in ids(b)
    assert remote.status == RequestStatus.WAITING_FOR_REMOTE_KVS and len(remote.block_ids) == 2
    conn.ready.add("remote")
    run(s)
    assert len(remote.output_token_ids) == 3 and len(local.output_token_ids) == 3
    assert pool.num_free == pool.num_blocks


@pytest.mark.parametrize("caching", [False, True])
def test_random_workload_with_priorities_never_leaks(caching):
    rng = random.Random(3)
    s, pool = make(num_blocks=30, block_size=4, budget=24, max_seqs=6, caching=caching)
    conn = FakeConnector()
    s.connector = conn
    n = 0
    remotes: list[Request] = []
    for _ in range(600):
        if rng.random() < 0.3:
            r = req(f"r{n}", rng.randint(1, 30), max_tokens=rng.randint(1, 20), priority=rng.randint(-2, 2),
                    first_token=rng.choice([0, 50]))
            if rng.random() < 0.2:
                r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                remotes.append(r)
            s.add(r)
            n += 1
        for r in list(remotes):
            if not r.block_ids and s.allocate_for_remote(r):
                conn.ready.add(r.request_id)
                remotes.remove(r)
        if s.requests and rng.random() < 0.03:
            victim = rng.choice(list(s.requests))
            s.finish(victim, RequestStatus.FINISHED_ABORTED)
            remotes = [r for r in remotes if r.request_id != victim]
        step(s, token=rng.randint(0, 99))
    while remotes:
        for r in list(remotes):
            if s.allocate_for_remote(r):
                conn.ready.add(r.request_id)
                remotes.remove(r)
        step(s)
    run(s, max_steps=5000)
    assert pool.num_free == pool.num_blocks
    assert s.num_preemptions > 0
