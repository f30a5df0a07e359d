"""The scheduler and block pool driven without a model: sampled tokens are made up."""

import random

import pytest

from pdserve.config import SchedulerConfig
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch, Scheduler


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True):
    pool = BlockPool(num_blocks)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(cfg, pool, block_size), pool


def req(rid, n_prompt, max_tokens=4, **kw):
    return Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens, **kw), eos_token_ids=frozenset())


def run(s: Scheduler, max_steps=1000):
    """Drive to completion, returning the batches; asserts invariants every step."""
    batches = []
    for _ in range(max_steps):
        if not s.num_unfinished:
            break
        b = s.schedule()
        assert b.num_tokens <= s.config.max_num_batched_tokens
        assert len(s.running) <= s.config.max_num_seqs
        batches.append(b)
        sampled = {r.request_id: 7 for r in b.decodes + [r for r, _ in b.prefills]}
        s.update_after_step(b, sampled)
        s.check_integrity()
    assert not s.num_unfinished
    return batches


def test_chunked_prefill_respects_budget_and_finishes():
    s, pool = make(budget=16)
    r = req("a", 50, max_tokens=3)
    s.add(r)
    batches = run(s)
    chunk_sizes = [n for b in batches for _, n in b.prefills]
    assert chunk_sizes == [16, 16, 16, 2]
    assert r.output_token_ids == [7, 7, 7]
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert pool.num_free == pool.num_blocks


def test_decodes_scheduled_before_new_prefills():
    s, _ = make(budget=8)
    s.add(req("a", 4, max_tokens=10))
    b = s.schedule()
    s.update_after_step(b, {"a": 1})
    s.add(req("b", 20))
    b2 = s.schedule()
    assert [r.request_id for r in b2.decodes] == ["a"]
    assert [(r.request_id, n) for r, n in b2.prefills] == [("b", 7)]


def test_max_num_seqs():
    s, _ = make(max_seqs=2, budget=100)
    for i in range(5):
        s.add(req(str(i), 3))
    b = s.schedule()
    assert b.num_tokens == 6 and len(s.running) == 2
    run(s)


def test_preemption_by_recompute_when_blocks_run_out():
    s, pool = make(num_blocks=6, block_size=4, budget=64)
    a, b = req("a", 8, max_tokens=12), req("b", 8, max_tokens=12)
    s.add(a)
    s.add(b)
    batches = run(s)
    assert any(bt.preempted for bt in batches)
    assert b.num_preemptions >= 1
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert pool.num_free == 6


def test_abort_frees_blocks_at_once():
    s, pool = make()
    r = req("a", 30, max_tokens=100)
    s.add(r)
    s.update_after_step(s.schedule(), {"a": 1})
    assert pool.num_free < pool.num_blocks
    assert s.finish("a", RequestStatus.FINISHED_ABORTED) is r
    assert pool.num_free == pool.num_blocks
    assert s.finish("a", RequestStatus.FINISHED_ABORTED) is None
    s.check_integrity()


def test_no_chunked_prefill_waits_for_budget():
    s, _ = make(budget=8, chunked=False)
    s.add(req("a", 20))
    assert s.schedule().is_empty


def test_duplicate_id_rejected():
    s, _ = make()
    s.add(req("a", 3))
    with pytest.raises(ValueError):
        s.add(req("a", 3))


class FakeConnector:
    """A stand-in for the KV connector: reports readiness when told to."""

    def __init__(self):
        self.ready: set[str] = set()
        self.failed: dict[str, str] = {}
        self.held: list[Request] = []

    def poll(self):
        r, f = self.ready, self.failed
        self.ready, self.failed = set(), {}
        return r, f

    def on_request_finished(self, request):
        return False


def test_waiting_for_remote_kvs_is_skipped_until_ready():
    s, pool = make()
    conn = FakeConnector()
    s.connector = conn
    r = req("remote", 10, max_tokens=2)
    r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    s.add(r)
    assert s.allocate_for_remote(r)
    s.add(req("local", 3, max_tokens=1))
    b = s.schedule()
    assert [x.request_id for x, _ in b.prefills] == ["local"] and not b.decodes
    s.update_after_step(b, {"local": 1})
    assert s.schedule().is_empty
    conn.ready.add("remote")
    b = s.schedule()
    # Only the last prompt token is recomputed: the rest arrived from the remote instance.
    assert [x.request_id for x in b.decodes] == ["remote"]
    s.update_after_step(b, {"remote": 5})
    run(s)
    assert r.output_token_ids == [5, 7]
    assert pool.num_free == pool.num_blocks


def test_remote_failure_finishes_with_error():
    s, pool = make()
    conn = FakeConnector()
    s.connector = conn
    r = req("remote", 10)
    r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    s.add(r)
    s.allocate_for_remote(r)
    conn.failed["remote"] = "transfer timed out"
    s.schedule()
    assert r.status == RequestStatus.FINISHED_ERROR and r.error == "transfer timed out"
    assert pool.num_free == pool.num_blocks


def test_random_workload_never_leaks():
    rng = random.Random(0)
    s, pool = make(num_blocks=40, block_size=4, budget=24, max_seqs=6)
    n = 0
    for _ in range(400):
        if rng.random() < 0.3:
            s.add(req(f"r{n}", rng.randint(1, 40), max_tokens=rng.randint(1, 20)))
            n += 1
        if s.requests and rng.random() < 0.05:
            s.finish(rng.choice(list(s.requests)), RequestStatus.FINISHED_ABORTED)
        b = s.schedule()
        s.update_after_step(b, {r.request_id: 1 for r in b.decodes + [r for r, _ in b.prefills]})
        s.check_integrity()
    run(s, max_steps=5000)
    assert pool.num_free == pool.num_blocks


def test_no_head_of_line_deadlock_behind_a_request_that_cannot_fit():
    """Remote-KV requests hold their blocks while waiting; a preempted request at the head of the
    queue that cannot get blocks must not stop them from running (and freeing their blocks)."""
    s, pool = make(num_blocks=8, block_size=4, budget=64)
    conn = FakeConnector()
    s.connector = conn
    big = req("big", 20, max_tokens=2)  # needs 5 blocks
    s.add(big)
    remotes = [req(f"r{i}", 8, max_tokens=2) for i in range(3)]  # 2 blocks each: 6 of 8 held
    for r in remotes:
        r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        s.add(r)
        assert s.allocate_for_remote(r)
    conn.ready |= {r.request_id for r in remotes}
    run(s)
    assert all(len(r.output_token_ids) == 2 for r in remotes + [big])
    assert pool.num_free == pool.num_blocks


def test_ready_remote_requests_go_first_no_self_preemption_livelock():
    """A chunked prefill that keeps preempting itself for lack of blocks must not starve requests
    whose remote KV has landed (they hold the blocks it needs)."""
    s, pool = make(num_blocks=8, block_size=4, budget=8)
    conn = FakeConnector()
    s.connector = conn
    big = req("big", 16, max_tokens=2)  # 4 blocks, two 8-token chunks
    s.add(big)
    s.update_after_step(s.schedule(), {"big": 1})  # first chunk: big holds 2 blocks
    remotes = [req(f"r{i}", 8, max_tokens=2) for i in range(3)]
    for r in remotes:
        r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        s.add(r)
        assert s.allocate_for_remote(r)  # 6 blocks held: big cannot grow
    conn.ready |= {r.request_id for r in remotes}
    run(s, max_steps=200)
    assert all(len(r.output_token_ids) == 2 for r in [*remotes, big])
    assert pool.num_free == pool.num_blocks


def test_one_token_prompt_chunk_with_prompt_logprobs_is_a_prefill():
    """The runner computes prompt logprobs from prefill chunks: a one-token chunk inside such a
    prompt (a decode beside it left one token of the budget) is scheduled as a prefill."""
    s, _ = make(budget=2)
    s.add(req("d", 2, max_tokens=20))
    s.update_after_step(s.schedule(), {"d": 1})
    s.add(req("asked", 4, prompt_logprobs=0))
    b = s.schedule()
    assert [x.request_id for x in b.decodes] == ["d"] and [(x.request_id, n) for x, n in b.prefills] == [("asked", 1)]
    s.update_after_step(b, {"d": 1, "asked": 1})
    s.finish("asked", RequestStatus.FINISHED_ABORTED)
    s.add(req("plain", 4))
    b = s.schedule()
    assert [x.request_id for x in b.decodes] == ["d", "plain"] and not b.prefills
    # The last prompt token's chunk samples the first output token: an ordinary decode.
    last = req("last", 4, prompt_logprobs=0)
    last.num_computed_tokens = 3
    batch = ScheduledBatch()
    Scheduler._add_to_batch(batch, last, 1)
    assert batch.decodes == [last]


def test_a_context_outgrowing_the_whole_cache_ends_with_length():
    """Prompt + max_tokens beyond every block of the cache: the request stops at the cache's end
    ("length") instead of preempting itself for ever; the others go on."""
    s, pool = make(num_blocks=4, block_size=4)
    long, short = req("long", 10, max_tokens=50), req("short", 2, max_tokens=2)
    s.add(long)
    s.add(short)
    run(s, max_steps=200)
    assert long.status == RequestStatus.FINISHED_LENGTH and long.num_tokens == 4 * 4 + 1  # the last sampled
    assert short.status == RequestStatus.FINISHED_LENGTH and short.output_token_ids == [7, 7]
    assert pool.num_free == pool.num_blocks
