"""Priority scheduling through the engine and the offline API: a high-priority request submitted
behind a queue of low-priority ones finishes first (order, not timing); fcfs refuses priorities;
disaggregated prefill and decode engines under priority keep their outputs and their blocks."""

from __future__ import annotations

import asyncio

import pytest

from pdserve import LLM, SamplingParams
from pdserve.config import CacheConfig, EngineConfig, KVTransferConfig, SchedulerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import StepOutput
from tests.unit.test_kv_transfer import close, prompts, wait_blocks_free, write_params

MODEL = "dummy:qwen3-tiny"
LOW = [[(7 * j + i) % 250 for j in range(8)] for i in range(4)]
HIGH = [(11 * j) % 250 for j in range(8)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _finish_order(
    engine: LLMEngine, low_steps: int, low: int = 1, high: int = 0
) -> tuple[list[str], dict[str, list[int]]]:
    """Queue the low-priority requests, step `low_steps` times, queue "high", run to the end: the
    order the requests finished in, and each one's tokens."""
    tokens: dict[str, list[int]] = {}
    order: list[str] = []

    def take(outs):
        for o in outs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                order.append(o.request_id)

    for i, prompt in enumerate(LOW):
        engine.add_request(f"low{i}", prompt, _greedy(16), priority=low)
    for _ in range(low_steps):
        take(engine.step())
    engine.add_request("high", HIGH, _greedy(4), priority=high)
    take(engine.run_until_done())
    engine.scheduler.check_integrity()
    assert engine.block_pool.num_free == engine.block_pool.num_blocks
    return order, tokens


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """Every request alone-ish: a cache large enough that nobody is preempted."""
    llm = LLM(MODEL, dtype="float32", block_size=4, num_kv_blocks=256)
    try:
        outs = llm.generate([*LOW, HIGH], [_greedy(16)] * 4 + [_greedy(4)])
    finally:
        llm.close()
    return {name: o.outputs[0].token_ids for name, o in zip(["low0", "low1", "low2", "low3", "high"], outs,
                                                              strict=True)}


def test_high_priority_takes_the_next_free_seat():
    """One sequence at a time: "high" runs as soon as the running request ends, before the queue."""
    llm = LLM(MODEL, dtype="float32", max_num_seqs=1, scheduling_policy="priority")
    try:
        order, _ = _finish_order(llm.engine, low_steps=2)
    finally:
        llm.close()
    assert order == ["low0", "high", "low1", "low2", "low3"]


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_high_priority_preempts_when_the_cache_is_full(policy, reference):
    """The low-priority requests fill the KV cache; under priority "high" preempts the worst of
    them and finishes first, under fcfs it waits its turn. Recomputed requests produce the same tokens."""
    llm = LLM(MODEL, dtype="float32", block_size=4, num_kv_blocks=13, scheduling_policy=policy)
    try:
        engine = llm.engine
        if policy == "fcfs":  # the same scenario without priorities: fcfs refuses them
            with pytest.raises(ValueError, match="priority scheduling policy"):
                engine.add_request("x", HIGH, _greedy(4), priority=-1)
            assert not engine.has_unfinished()
            order, tokens = _finish_order(engine, low_steps=3, low=0)
        else:
            order, tokens = _finish_order(engine, low_steps=3)
        preemptions = engine.scheduler.num_preemptions
    finally:
        llm.close()
    assert tokens == reference
    assert preemptions > 0
    if policy == "priority":
        assert order == ["high", "low0", "low1", "low2", "low3"]
    else:  # it waits until two of the requests before it are done
        assert order == ["low0", "low1", "high", "low2", "low3"]


def test_generate_takes_one_priority_per_prompt(reference):
    llm = LLM(MODEL, dtype="float32", block_size=4, num_kv_blocks=256, max_num_seqs=1, scheduling_policy="priority")
    try:
        outs = llm.generate([*LOW, HIGH], [_greedy(16)] * 4 + [_greedy(4)], priority=[3, 2, 1, 0, -1])
        assert [o.outputs[0].token_ids for o in outs] == [reference[k] for k in ("low0", "low1", "low2", "low3",
                                                                                  "high")]
        with pytest.raises(ValueError, match="2 prompts but 1 priorities"):
            llm.generate([HIGH, HIGH], _greedy(1), priority=[0])
    finally:
        llm.close()
    fcfs = LLM(MODEL, dtype="float32")
    try:
        with pytest.raises(ValueError, match="needs the priority scheduling policy"):
            fcfs.generate([HIGH], _greedy(1), priority=[1])
        assert fcfs.generate([HIGH], _greedy(4), priority=[0])[0].outputs[0].token_ids == reference["high"]
    finally:
        fcfs.close()
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(MODEL, scheduling_policy="lifo")


@pytest.mark.parametrize("mode", ["read", "write"])
def test_disaggregated_requests_under_priority(mode):
    """Prefill and decode both schedule by priority; a small decode cache makes remote-KV requests
    wait for blocks and preempt each other: every output still equals the standalone one, and every
    block comes back."""
    def make(role: str, blocks: int) -> AsyncEngine:
        return AsyncEngine(LLMEngine(EngineConfig(
            model=MODEL, dtype="float32", cache=CacheConfig(num_kv_blocks=blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=32, policy="priority"),
            kv_transfer=KVTransferConfig(role=role, kv_mode=mode, kv_transport="shm"),  # type: ignore[arg-type]
        )))

    async def generate(eng: AsyncEngine, rid: str, prompt: list[int], kvp: dict | None, sp: SamplingParams,
                       priority: int) -> tuple[list[int], StepOutput]:
        toks: list[int] = []
        async for out in eng.generate(rid, prompt, sp, kvp, priority=priority):
            toks += out.new_token_ids
        return toks, out

    s, p, d = make("standalone", 64), make("prefill", 64), make("decode", 12)
    sp = _greedy(24)
    try:
        async def one(i: int, prompt: list[int]) -> list[int]:
            rid, prio = f"r{i}", (i * 7) % 3 - 1
            if mode == "read":
                _, pout = await generate(p, rid, prompt, {"do_remote_decode": True}, _greedy(1), prio)
                toks, out = await generate(d, rid, prompt, pout.kv_transfer_params, sp, prio)  # type: ignore[arg-type]
            else:
                (_, _), (toks, out) = await asyncio.gather(
                    generate(p, rid, prompt, {"do_remote_decode": True, "transfer_mode": "WRITE"}, _greedy(1), prio),
                    generate(d, rid, prompt, write_params(p), sp, prio))
            assert out.error is None, out.error
            return toks

        async def main() -> None:
            batch = prompts((5, 40, 100, 17, 60, 33), seed=4)
            refs = [(await generate(s, f"ref{i}", prompt, None, sp, 0))[0] for i, prompt in enumerate(batch)]
            assert await asyncio.gather(*(one(i, prompt) for i, prompt in enumerate(batch))) == refs

        asyncio.run(main())
        wait_blocks_free(s, p, d)
        assert d.engine.scheduler.num_preemptions > 0
    finally:
        close(s, p, d)
