"""Prefix caching without a model: the block pool's cache index, the hash chain, and the scheduler
taking cached prefixes and registering computed blocks (integrity checked every step)."""

from __future__ import annotations

import random

import pytest

from pdserve.config import SchedulerConfig
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.prefix_cache import block_hashes
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch, Scheduler

BS = 4


def make(num_blocks=64, budget=64, max_seqs=8, caching=True) -> tuple[Scheduler, BlockPool]:
    pool = BlockPool(num_blocks)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    return Scheduler(cfg, pool, BS, prefix_caching=caching), pool


def req(rid: str, tokens: list[int], max_tokens=3, **kw) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, **kw), eos_token_ids=frozenset())


def step(s: Scheduler, token: int = 7) -> ScheduledBatch:
    b = s.schedule()
    s.update_after_step(b, {r.request_id: token for r in b.decodes + [r for r, _ in b.prefills]})
    s.check_integrity()
    return b


def run(s: Scheduler, max_steps=2000) -> list[ScheduledBatch]:
    batches = []
    for _ in range(max_steps):
        if not s.num_unfinished:
            return batches
        batches.append(step(s))
    raise AssertionError("requests did not finish")


def prefill_tokens(batches: list[ScheduledBatch], rid: str) -> int:
    return sum(n for b in batches for r, n in b.prefills if r.request_id == rid)


# ---- block pool --------------------------------------------------------------------------------
def test_pool_cache_hit_takes_a_free_block_back_and_shares_a_used_one():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.register(a, b"ha")
    pool.register(b, b"hb")
    assert pool.cached_prefix([b"ha", b"hb", b"hc"]) == [a, b]
    assert pool.cached_prefix([b"hb"]) == [b]  # any registered content, not only from the start
    pool.free([a])
    assert pool.num_free == 3 and pool.is_cached(a)
    pool.take_cached([a, b])  # a: off the free list; b: a second reference
    assert pool.num_free == 2 and pool.ref_count(a) == 1 and pool.ref_count(b) == 2
    pool.check_integrity()
    pool.free([a, b, b])
    assert pool.num_free == 4 and pool.num_cached == 2
    pool.check_integrity()


def test_pool_evicts_least_recently_freed_cached_blocks_last():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, blk in enumerate(blocks):
        pool.register(blk, bytes([i]))
    pool.free([blocks[2], blocks[0], blocks[1]])  # freed in this order: evicted in this order
    (first,) = pool.allocate(1)
    assert first == blocks[2] and not pool.is_cached(first)
    assert pool.cached_prefix([bytes([0])]) == [blocks[0]] and pool.num_evictions == 1
    pool.allocate(1)
    assert pool.cached_prefix([bytes([0])]) == [] and pool.cached_prefix([bytes([1])]) == [blocks[1]]
    pool.check_integrity()


def test_pool_keeps_the_first_block_of_duplicate_content_and_refuses_free_blocks():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.register(a, b"same")
    pool.register(b, b"same")  # computed at the same time by another request
    assert pool.cached_prefix([b"same"]) == [a] and not pool.is_cached(b)
    pool.free([b])
    with pytest.raises(ValueError, match="free block"):
        pool.register(b, b"other")
    with pytest.raises(ValueError, match="not cached"):
        pool.take_cached([b])
    pool.check_integrity()


def test_pool_integrity_catches_a_broken_index():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.register(a, b"h")
    pool._cached[b"h"] = 1 - a  # corrupt: the index names the wrong block
    with pytest.raises(AssertionError, match="does not carry its hash"):
        pool.check_integrity()


# ---- hash chain --------------------------------------------------------------------------------
def test_block_hash_names_the_whole_prefix():
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = req("b", [9, 9, 9, 9, 5, 6, 7, 8])
    ha, hb = block_hashes(a, BS, 2), block_hashes(b, BS, 2)
    assert ha[0] != hb[0] and ha[1] != hb[1]  # same tokens in block 1, different prefix
    assert block_hashes(req("c", [1, 2, 3, 4, 5, 6, 7, 8]), BS, 2) == ha
    assert a.block_hashes == ha  # kept on the request
    with pytest.raises(ValueError, match="not full"):
        block_hashes(a, BS, 3)


def test_cache_salt_starts_its_own_chain():
    """vLLM's cache_salt is mixed into the first block's hash: equal tokens under another salt (or
    none) share no block hash; the same salt shares all of them."""
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]

    def salted(name: str, salt: str | None) -> list[bytes]:
        r = req(name, tokens)
        r.cache_salt = salt
        return block_hashes(r, BS, 2)

    plain, a, b = salted("p", None), salted("a", "a"), salted("b", "b")
    assert plain == block_hashes(req("q", tokens), BS, 2)  # unsalted: as before salts existed
    assert not set(a) & set(plain) and not set(a) & set(b)
    assert salted("a2", "a") == a


# ---- scheduler ---------------------------------------------------------------------------------
def test_second_request_starts_after_the_shared_prefix():
    s, pool = make()
    shared = list(range(100, 118))  # 4 full blocks + 2 tokens
    s.add(req("a", shared + [1, 2, 3]))
    run(s)
    s.add(r := req("b", shared + [4, 5, 6, 7, 8]))
    batches = run(s)
    assert r.num_cached_tokens == 16 and prefill_tokens(batches, "b") == 23 - 16
    assert s.prefix_cache_hits == 16 and s.prefix_cache_queries == 21 + 23
    assert pool.num_free == pool.num_blocks


def test_identical_prompt_recomputes_its_last_token():
    """A prompt of whole blocks, all cached: the last block is computed again (its last token's
    logits are needed), in a block of the request's own."""
    s, pool = make()
    prompt = list(range(16))
    s.add(a := req("a", prompt, max_tokens=5))
    step(s)  # a's prompt computed: its 4 blocks registered
    s.add(b := req("b", prompt, max_tokens=2))
    batch = step(s)
    assert batch.decodes == [a] and batch.prefills == [(b, 4)] and b.num_cached_tokens == 12
    assert b.block_ids[:3] == a.block_ids[:3] and b.block_ids[3] != a.block_ids[3]
    run(s)
    assert pool.num_free == pool.num_blocks


def test_running_requests_share_cached_blocks():
    s, pool = make()
    shared = list(range(50, 62))  # 3 blocks
    s.add(a := req("a", shared + [1], max_tokens=20))
    step(s)
    step(s)
    s.add(b := req("b", shared + [2], max_tokens=5))
    step(s)
    assert a.block_ids[:3] == b.block_ids[:3] and a.block_ids[3] != b.block_ids[3]
    assert all(pool.ref_count(blk) == 2 for blk in a.block_ids[:3])
    run(s)
    assert pool.num_free == pool.num_blocks and pool.num_cached >= 3


def test_prompt_logprobs_requests_compute_every_position():
    s, _ = make()
    shared = list(range(30, 50))
    s.add(req("a", shared))
    run(s)
    s.add(b := req("b", shared + [1], prompt_logprobs=0))
    batches = run(s)
    assert b.num_cached_tokens == 0 and prefill_tokens(batches, "b") == 21


def test_disabled_cache_never_hits():
    s, pool = make(caching=False)
    s.add(req("a", list(range(20))))
    run(s)
    s.add(b := req("b", list(range(20))))
    batches = run(s)
    assert b.num_cached_tokens == 0 and prefill_tokens(batches, "b") == 20 and pool.num_cached == 0


def test_preempted_request_resumes_from_its_own_cached_blocks():
    s, pool = make(num_blocks=10, budget=64)
    s.add(a := req("a", list(range(200, 216)), max_tokens=12))  # 4 blocks, grows to 7
    s.add(b := req("b", list(range(300, 316)), max_tokens=12))
    batches = run(s)
    assert sum(len(bt.preempted) for bt in batches) >= 1
    victim = a if a.num_preemptions else b
    # Its recompute started from blocks it had computed itself, not from zero.
    assert prefill_tokens(batches, victim.request_id) < 2 * 16 + victim.num_preemptions * 12
    assert victim.num_cached_tokens == 0  # usage counts only what the first admission found
    assert pool.num_free == pool.num_blocks


def test_a_prefix_that_cannot_get_its_other_blocks_is_given_back():
    s, pool = make(num_blocks=8, budget=64)
    shared = list(range(16))  # 4 blocks
    s.add(req("a", shared, max_tokens=1))
    run(s)
    s.add(hog := req("hog", list(range(500, 510)), max_tokens=8))  # 3 blocks, growing to 5
    step(s)
    s.add(b := req("b", shared + list(range(40, 50)), max_tokens=1))  # 4 cached + 3 new: 1 free
    step(s)
    assert b.status == RequestStatus.WAITING and not b.block_ids and b.num_computed_tokens == 0
    assert not hog.is_finished and pool.num_cached == 4 + 2  # a's blocks, and hog's full ones
    run(s)
    # hog's growth evicted the least recently freed cached block (a's last): b found 3 of 4.
    assert b.num_cached_tokens == 12 and pool.num_free == pool.num_blocks


def test_random_overlapping_prompts_keep_the_pool_consistent():
    """Many requests over a few shared prefixes, a pool small enough to evict and preempt."""
    rng = random.Random(0)
    roots = [[rng.randrange(1000) for _ in range(rng.randrange(4, 30))] for _ in range(4)]
    s, pool = make(num_blocks=24, budget=24, max_seqs=6)
    reqs = []
    for i in range(60):
        tokens = rng.choice(roots)[: rng.randrange(1, 30)] + [rng.randrange(1000) for _ in range(rng.randrange(0, 8))]
        r = req(f"r{i}", tokens or [1], max_tokens=rng.randrange(1, 10))
        reqs.append(r)
        s.add(r)
        if rng.random() < 0.5:
            step(s, token=rng.randrange(1000))
    run(s)
    assert pool.num_free == pool.num_blocks and pool.num_evictions > 0
    assert s.prefix_cache_hits > 0 and all(r.is_finished for r in reqs)
    assert all(r.num_cached_tokens % BS == 0 and r.num_cached_tokens < r.num_prompt_tokens for r in reqs)


def test_remote_kv_request_takes_its_cached_prefix_and_waits_for_the_rest():
    """Decode side: the leading blocks our cache holds are the request's own first blocks (counted
    computed: the transfer skips them); the rest are new blocks for the remote KV."""
    from tests.unit.test_scheduler import FakeConnector

    s, pool = make()
    s.connector = conn = FakeConnector()
    shared = list(range(60, 72))  # 3 blocks
    s.add(a := req("a", shared + [1, 2], max_tokens=1))
    run(s)
    s.add(r := req("remote", shared + [3, 4, 5], max_tokens=2))
    r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    assert s.allocate_for_remote(r)
    assert r.num_computed_tokens == 12 and len(r.block_ids) == 4
    assert pool.cached_prefix(block_hashes(a, BS, 3)) == r.block_ids[:3] and not pool.is_cached(r.block_ids[3])
    assert s.prefix_cache_hits == 12
    conn.ready.add("remote")
    b = step(s)
    assert b.decodes == [r] and r.num_computed_tokens == 15  # only the last prompt token computed
    run(s)
    assert pool.num_free == pool.num_blocks


def test_remote_kv_request_without_room_gives_its_cached_prefix_back():
    from tests.unit.test_scheduler import FakeConnector

    s, pool = make(num_blocks=5)
    s.connector = FakeConnector()
    s.add(req("a", list(range(8)) + [1], max_tokens=1))  # 2 cached blocks after it
    run(s)
    s.add(hog := req("hog", list(range(100, 108)), max_tokens=1))
    hog.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    assert s.allocate_for_remote(hog)  # 2 new blocks (evicting nothing: 3 were uncached)
    s.add(r := req("remote", list(range(8)) + list(range(20, 30)), max_tokens=1))  # 2 cached + 3 new
    r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    assert not s.allocate_for_remote(r)
    assert not r.block_ids and r.num_computed_tokens == 0 and pool.num_cached >= 2
    s.check_integrity()


def test_reset_forgets_free_cached_blocks_and_keeps_held_ones():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.register(a, b"ha")
    pool.register(b, b"hb")
    pool.free([a])
    assert pool.reset_cache() == 1
    assert pool.cached_prefix([b"ha"]) == [] and pool.cached_prefix([b"hb"]) == [b]
    pool.check_integrity()
    pool.free([b])
    assert pool.reset_cache() == 1 and pool.num_cached == 0 and pool.num_free == 4
