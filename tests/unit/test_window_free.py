"""Sliding-window models free the KV blocks that slid out of every layer's window while a request runs.

The scheduler tests drive it without a model (made-up tokens); the engine tests run dummy:mistral-tiny
(every layer windowed, 16 tokens) in float32 and compare greedy tokens with freeing switched off.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.config import ModelConfig, SchedulerConfig
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.engine import EngineStats
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import ScheduledBatch, Scheduler
from pdserve.server.metrics import ServerMetrics
from tests.unit.test_kv_transfer import close, disagg, make, run, wait_blocks_free

BS, WINDOW, CHUNK = 4, 10, 8
BOUND = -(-(WINDOW + CHUNK) // BS) + 1  # blocks a request may hold at once: window + a chunk, + one straddling


def scheduler(num_blocks: int, window: int | None = WINDOW, caching: bool = False, policy: str = "fcfs"):
    pool = BlockPool(num_blocks)
    cfg = SchedulerConfig(max_num_batched_tokens=CHUNK, policy=policy)  # type: ignore[arg-type]
    return Scheduler(cfg, pool, BS, prefix_caching=caching, window=window), pool


def req(rid: str, n_prompt: int, max_tokens: int, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def step(s: Scheduler, token: int = 7) -> ScheduledBatch:
    b = s.schedule()
    s.update_after_step(b, {r.request_id: token for r in b.decodes + [r for r, _ in b.prefills]})
    s.check_integrity()
    return b


def drive(s: Scheduler, reqs: list[Request], max_steps: int = 2000) -> int:
    """Run to completion, checking integrity every step; the most blocks any request held at once."""
    most = 0
    for _ in range(max_steps):
        if not s.num_unfinished:
            return most
        step(s)
        most = max([most, *(len(r.held_block_ids) for r in reqs if not r.is_finished)])
    raise AssertionError("did not finish")


def test_kv_window_is_the_largest_when_every_layer_is_windowed():
    assert ModelConfig(sliding_windows=(8, 16)).kv_window == 16
    assert ModelConfig(sliding_windows=(8, None)).kv_window is None  # hybrid (Gemma 2 / 3): one table for all
    assert ModelConfig().kv_window is None


def test_a_long_request_holds_window_plus_chunk_and_frees_everything_once():
    s, pool = scheduler(num_blocks=12)  # 11 usable: without freeing 60 + 60 tokens need 30
    r = req("a", 60, max_tokens=60)
    s.add(r)
    most = drive(s, [r])
    assert r.status == RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 60
    assert most <= BOUND
    assert s.num_window_freed_blocks >= 30 - BOUND
    assert pool.num_free == pool.num_usable == 11 and pool.num_reserved == 1
    assert r.block_ids == [] and r.num_freed_blocks == 0


def test_the_first_live_block_follows_the_window():
    s, _ = scheduler(num_blocks=40)
    r = req("a", 24, max_tokens=20)
    s.add(r)
    for _ in range(3):  # three chunks of 8: 24 computed, its first token sampled
        step(s)
    pad = s.reclaimer.padding
    s.schedule()  # the decode at position 24 sees 15..24: blocks 0-2 (positions 0..11) are dead, block 3 is not
    assert r.num_freed_blocks == 3 and r.block_ids[:3] == [pad] * 3 and pad not in r.held_block_ids


def test_hybrid_models_free_nothing():
    window = ModelConfig(sliding_windows=(WINDOW, None)).kv_window
    s, pool = scheduler(num_blocks=40, window=window)
    r = req("a", 60, max_tokens=60)
    s.add(r)
    most = drive(s, [r])
    assert most == 30 and s.num_window_freed_blocks == 0 and pool.num_reserved == 0
    assert pool.num_free == pool.num_blocks


def test_shared_prefix_blocks_are_only_dereferenced():
    s, pool = scheduler(num_blocks=40, caching=True)
    a, b = req("a", 40, max_tokens=30), req("b", 40, max_tokens=30)
    s.add(a)
    while not a.output_token_ids:
        step(s)
    s.add(b)  # finds a's prompt blocks in the prefix cache (held by a, or freed by a and still cached)
    step(s)
    assert b.num_cached_tokens > 0
    drive(s, [a, b])
    assert pool.num_free == pool.num_usable
    s.add(c := req("c", 40, max_tokens=2))  # the freed blocks stay findable until evicted
    drive(s, [c])
    assert c.num_cached_tokens > 0 and pool.num_free == pool.num_usable


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_and_abort_free_every_block_once(policy):
    s, pool = scheduler(num_blocks=10, policy=policy)  # 9 usable: two requests of up to BOUND = 6 preempt
    reqs = [req(f"r{i}", 30, max_tokens=40, start=i) for i in range(3)]
    for r in reqs:
        s.add(r)
    preempted = False
    for _ in range(40):
        preempted |= bool(step(s).preempted)
    assert preempted and s.num_window_freed_blocks > 0
    victim = next(r for r in reqs if r.num_freed_blocks)
    s.finish(victim.request_id, RequestStatus.FINISHED_ABORTED)
    s.check_integrity()
    drive(s, reqs)
    assert pool.num_free == pool.num_usable


def test_speculative_rows_keep_what_later_queries_see():
    s, pool = scheduler(num_blocks=12)
    r = req("a", 20, max_tokens=80)
    s.add(r)
    while not r.output_token_ids:
        step(s)
    for i in range(30):
        b = s.schedule({"a": [1, 2, 3]})
        # The row's queries start at num_computed_tokens: what it sees from there on is kept.
        assert b.spec == {"a": [1, 2, 3]} and r.num_freed_blocks == max(0, r.num_computed_tokens - WINDOW + 1) // BS
        s.update_after_step(b, {"a": 5}, {"a": [1, 2, 3][: i % 4]})  # 0 to 3 drafts accepted
        s.check_integrity()
    drive(s, [r])
    assert pool.num_free == pool.num_usable


class Transfers:
    """A KV connector whose `pending` requests have a transfer in flight; finished ones it keeps."""

    def __init__(self) -> None:
        self.pending: set[str] = set()
        self.kept: list[Request] = []

    def poll(self):
        return set(), {}

    def serves(self, request_id: str) -> bool:
        return request_id in self.pending

    def on_request_finished(self, request: Request) -> bool:
        if request.request_id in self.pending:
            self.kept.append(request)
            return True
        return False


def test_no_early_free_while_a_kv_transfer_is_pending():
    s, pool = scheduler(num_blocks=40)
    s.connector = conn = Transfers()
    sending, plain = req("send", 60, max_tokens=1), req("plain", 60, max_tokens=1)
    conn.pending.add("send")
    s.add(sending)
    s.add(plain)
    drive(s, [sending, plain])
    assert sending.num_freed_blocks == 0 and len(sending.block_ids) == 15  # its whole prompt, for the peer
    assert conn.kept == [sending] and s.num_window_freed_blocks > 0
    s.release_blocks(sending)  # the transfer is done
    assert pool.num_free == pool.num_usable
    # Once nothing is pending (the KV landed), the request frees as any other.
    later = req("later", 40, max_tokens=20)
    conn.pending.add("later")
    s.add(later)
    for _ in range(5):
        step(s)
    assert later.num_freed_blocks == 0
    conn.pending.clear()
    drive(s, [later])
    assert s.num_window_freed_blocks > 0 and pool.num_free == pool.num_usable


def test_the_counter_is_a_metric():
    text = ServerMetrics(lambda: EngineStats(0, 0, 8, 8, num_window_freed_blocks=5), lambda: 0).render()
    assert "pdserve_kv_blocks_window_freed_total 5" in text


# ---- the engine, dummy:mistral-tiny (window 16) -------------------------------------------------------
MODEL = "dummy:mistral-tiny"
SP = SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def engine_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    passage = torch.randint(0, 256, (10,), generator=g).tolist()
    return [torch.randint(0, 256, (30,), generator=g).tolist(), passage * 3]


def llm(num_kv_blocks: int, freeing: bool, **kw) -> LLM:
    out = LLM(MODEL, dtype="float32", block_size=4, num_kv_blocks=num_kv_blocks, max_num_batched_tokens=12, **kw)
    if not freeing:
        out.engine.scheduler.reclaimer = None
    return out


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """Freeing off, a cache that holds both sequences whole (2 x 30 blocks)."""
    big = llm(80, freeing=False)
    return [o.outputs[0].token_ids for o in big.generate(engine_prompts(), SP)]


@pytest.mark.parametrize("spec", [None, SPEC], ids=["plain", "speculative"])
def test_greedy_tokens_equal_no_freeing_in_a_cache_too_small_without_it(reference, spec):
    # 17 usable blocks: each request holds at most ceil((16 + 12) / 4) + 1 = 8 at once, 30 without freeing.
    small = llm(18, freeing=True, speculative_config=spec)
    got = small.generate(engine_prompts(), SP)
    assert [o.outputs[0].token_ids for o in got] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in got)
    eng = small.engine
    assert eng.stats().num_window_freed_blocks > 0 and eng.stats().num_preemptions == 0
    if spec is not None:
        assert small.spec_decode_stats().num_accepted_tokens > 0
    eng.scheduler.check_integrity()
    assert eng.block_pool.num_free == eng.block_pool.num_usable


@pytest.mark.parametrize("mode", ["read", "write"])
def test_disaggregated_prefill_keeps_the_prompt_and_decode_frees_after_landing(mode):
    s, p, d = make(MODEL), make(MODEL, "prefill", mode, "shm"), make(MODEL, "decode", mode, "shm")
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompt = engine_prompts()[0] * 4  # 120 tokens: four 32-token chunks, the window far behind
    try:
        async def main():
            ref, _ = await run(s, "r", prompt, sp=sp)
            got, out = await disagg(p, d, "r", prompt, mode, sp)
            assert out.error is None and got == ref

        asyncio.run(main())
        assert p.engine.stats().num_window_freed_blocks == 0  # the whole prompt went to decode
        assert d.engine.stats().num_window_freed_blocks > 0
        wait_blocks_free(s, p, d)
    finally:
        close(s, p, d)


def test_a_prompt_longer_than_the_cache_is_admitted_when_it_never_holds_it_whole(reference):
    # 17 usable blocks of 4 (68 tokens) and a 150-token prompt: held at once at most the window and a
    # chunk (16 + 12 tokens), so a standalone instance serves it; its tokens equal freeing-off's in a big cache.
    prompt = engine_prompts()[1] * 5
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    big = llm(80, freeing=False)
    ref = big.generate([prompt], sp)[0].outputs[0].token_ids
    small = llm(18, freeing=True)
    assert small.generate([prompt], sp)[0].outputs[0].token_ids == ref
    assert small.engine.stats().num_preemptions == 0
    small.engine.scheduler.check_integrity()
    # Without chunked prefill the whole prompt is one step: it must fit whole.
    with pytest.raises(ValueError, match="KV blocks"):
        llm(18, freeing=True, enable_chunked_prefill=False).engine.validate_prompt(prompt, sp)


def test_a_prompt_whose_kv_moves_must_fit_the_cache_whole():
    p = make(MODEL, "prefill", "read", "shm", blocks=18)
    try:
        prompt = engine_prompts()[1] * 20  # 600 tokens: 38 blocks of 16, the cache has 17
        sp = SamplingParams(max_tokens=1, temperature=0.0)
        with pytest.raises(ValueError, match="KV blocks"):
            p.engine.validate_request(prompt, sp, {"do_remote_decode": True})
        p.engine.validate_request(prompt, sp, None)  # computed here alone: the window bounds it
    finally:
        close(p)
