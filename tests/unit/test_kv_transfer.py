"""Prefill and decode engines exchanging KV over real ZMQ sockets, shared memory and TCP.

Each engine runs its real step-loop thread (AsyncEngine); the test plays the proxy's part.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch
import zmq

from pdserve.config import CacheConfig, EngineConfig, KVTransferConfig, SchedulerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.messages import PROXY_ENGINE_ID, Abort
from pdserve.kv.notify import NotifySender

PROMPT_LENS = (5, 40, 100, 17)  # 100 tokens: several 32-token chunks
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def make(model: str, role: str = "standalone", mode: str = "read", transport: str = "auto",
         timeout: float = 10.0, lease: float = 30.0, policy: str = "fail", blocks: int = 64,
         kv_cache_dtype: str = "auto") -> AsyncEngine:
    return make_on("cpu", model, role, mode, transport, timeout, lease, policy, blocks, kv_cache_dtype)


def make_on(device: str, model: str, role: str = "standalone", mode: str = "read", transport: str = "auto",
            timeout: float = 10.0, lease: float = 30.0, policy: str = "fail", blocks: int = 64,
            kv_cache_dtype: str = "auto") -> AsyncEngine:
    cfg = EngineConfig(
        model=model,
        device=device,
        dtype="float32",
        cache=CacheConfig(num_kv_blocks=blocks, cache_dtype=kv_cache_dtype),  # type: ignore[arg-type]
        scheduler=SchedulerConfig(max_num_batched_tokens=32),
        kv_transfer=KVTransferConfig(role=role, kv_mode=mode, kv_transport=transport, kv_transfer_timeout=timeout,
                                     kv_lease_seconds=lease, kv_load_failure_policy=policy),
    )
    return AsyncEngine(LLMEngine(cfg))


def close(*engines: AsyncEngine) -> None:
    for e in engines:
        e.shutdown()
        e.engine.close()


def prompts(n_lens=PROMPT_LENS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in n_lens]


async def run(eng: AsyncEngine, rid: str, prompt: list[int], kvp=None, sp: SamplingParams = GREEDY):
    toks: list[int] = []
    last = None
    async for out in eng.generate(rid, prompt, sp, kvp):
        toks += out.new_token_ids
        last = out
    return toks, last


def write_params(prefill: AsyncEngine) -> dict:
    c = prefill.engine.connector
    return {"do_remote_prefill": True, "transfer_mode": "WRITE", "remote_host": c.host,
            "remote_handshake_port": c.handshake_port, "remote_notify_port": c.notify_port,
            "remote_engine_id": c.engine_id}


async def disagg(p: AsyncEngine, d: AsyncEngine, rid: str, prompt: list[int], mode: str, sp=GREEDY):
    """One request through prefill then decode, as the proxy would send it."""
    if mode == "read":
        _, pout = await run(p, rid, prompt, {"do_remote_decode": True})
        assert pout.kv_transfer_params is not None
        return await run(d, rid, prompt, pout.kv_transfer_params, sp)
    (_, _), (toks, dout) = await asyncio.gather(
        run(p, rid, prompt, {"do_remote_decode": True, "transfer_mode": "WRITE"}),
        run(d, rid, prompt, write_params(p), sp),
    )
    return toks, dout


def wait_blocks_free(*engines: AsyncEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(e.stats.num_free_blocks == e.stats.num_total_blocks for e in engines):
            break
        time.sleep(0.02)
    for e in engines:
        assert e.stats.num_free_blocks == e.stats.num_total_blocks, f"{e.engine.config.kv_transfer.role} leaked"
        e.engine.scheduler.check_integrity()


@pytest.mark.parametrize("model", ["dummy:qwen3-tiny", "dummy:qwen3-moe-tiny"])
@pytest.mark.parametrize("mode", ["read", "write"])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_disaggregated_output_equals_standalone(model, mode, transport):
    s, p, d = make(model), make(model, "prefill", mode, transport), make(model, "decode", mode, transport)
    try:
        async def main():
            for i, prompt in enumerate(prompts()):
                ref, _ = await run(s, f"r{i}", prompt)
                got, out = await disagg(p, d, f"r{i}", prompt, mode)
                assert out.error is None and out.finish_reason == "length"
                assert got == ref, f"prompt of {len(prompt)} tokens"

        asyncio.run(main())
        assert d.engine.connector.stats.bytes_moved + p.engine.connector.stats.bytes_moved > 0
        wait_blocks_free(s, p, d)
    finally:
        close(s, p, d)


def _snapshot_on_release(engine: LLMEngine, store: dict) -> None:
    """Record each request's prompt KV (all layers) just before its blocks are freed."""
    sched = engine.scheduler
    orig = sched.release_blocks
    bs = engine.layout.block_size

    cache = engine.kv_cache.tensor
    cache = cache.view(torch.uint8) if cache.element_size() == 1 else cache  # float8: its bytes

    def release(req):
        if req.block_ids:
            kv = cache[:, req.block_ids]  # [L, nb, 2, kvh, bs, hd]
            kv = kv.permute(0, 2, 1, 4, 3, 5)  # token-major: [L, 2, nb, bs, kvh, hd]
            kv = kv.reshape(kv.shape[0], 2, len(req.block_ids) * bs, *kv.shape[-2:])
            store[req.request_id] = kv[:, :, : req.num_prompt_tokens].clone()
        orig(req)

    sched.release_blocks = release
    if engine.connector is not None:
        engine.connector.release = release


@pytest.mark.parametrize("mode", ["read", "write"])
def test_decode_blocks_hold_the_standalone_kv(mode):
    tiny = "dummy:qwen3-tiny"
    s, p, d = make(tiny), make(tiny, "prefill", mode), make(tiny, "decode", mode)
    s_kv: dict = {}
    d_kv: dict = {}
    _snapshot_on_release(s.engine, s_kv)
    _snapshot_on_release(d.engine, d_kv)
    try:
        prompt = prompts((75,))[0]
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        asyncio.run(run(s, "x", prompt, sp=one))
        asyncio.run(disagg(p, d, "x", prompt, mode, sp=one))
        # Every prompt token but the last arrived from the prefill instance bit for bit; the last is
        # recomputed on the decode side (a decode-shaped kernel: equal within rounding).
        assert torch.equal(d_kv["x"][:, :, :-1], s_kv["x"][:, :, :-1])
        torch.testing.assert_close(d_kv["x"][:, :, -1], s_kv["x"][:, :, -1], rtol=1e-5, atol=1e-5)
    finally:
        close(s, p, d)


@pytest.mark.parametrize("mode", ["read", "write"])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_fp8_blocks_arrive_byte_identical(mode, transport):
    """--kv-cache-dtype fp8 on both sides: the float8 bytes move as they are (one byte an element),
    and the pair generates what a standalone fp8 instance does."""
    tiny, fp8 = "dummy:qwen3-tiny", "fp8"
    s = make(tiny, kv_cache_dtype=fp8)
    p, d = (make(tiny, role, mode, transport, kv_cache_dtype=fp8) for role in ("prefill", "decode"))
    p_kv: dict = {}
    d_kv: dict = {}
    _snapshot_on_release(p.engine, p_kv)
    _snapshot_on_release(d.engine, d_kv)
    try:
        prompt = prompts((75,))[0]
        ref, _ = asyncio.run(run(s, "x", prompt))
        got, out = asyncio.run(disagg(p, d, "x", prompt, mode))
        assert out.error is None and got == ref
        wait_blocks_free(p, d)
        layout = d.engine.layout
        assert d.engine.kv_cache.tensor.dtype == p.engine.kv_cache.tensor.dtype == torch.float8_e4m3fn
        assert layout.block_bytes == 2 * layout.num_kv_heads * layout.block_size * layout.head_dim
        # Every prompt token but the last (recomputed by the decode) arrived bit for bit.
        assert torch.equal(d_kv["x"][:, :, :-1], p_kv["x"][:, :, :-1])
        moved = d.engine.connector.stats.bytes_moved + p.engine.connector.stats.bytes_moved
        assert moved == -(-75 // layout.block_size) * layout.num_layers * layout.block_bytes
    finally:
        close(s, p, d)


@pytest.mark.parametrize(("mode", "prefill_dtype", "decode_dtype"),
                         [("read", "fp8", "auto"), ("write", "auto", "fp8_e5m2"), ("read", "fp8", "fp8_e5m2")])
def test_mismatched_kv_cache_dtype_is_refused(mode, prefill_dtype, decode_dtype):
    tiny = "dummy:qwen3-tiny"
    p = make(tiny, "prefill", mode, kv_cache_dtype=prefill_dtype, timeout=5)
    d = make(tiny, "decode", mode, kv_cache_dtype=decode_dtype, timeout=5)
    try:
        _, out = asyncio.run(disagg(p, d, "x", prompts((20,))[0], mode))
        assert out.finish_reason == "error"
        assert "KV cache dtype mismatch" in out.error and "--kv-cache-dtype" in out.error, out.error
        wait_blocks_free(p, d)
    finally:
        close(p, d)


def test_mismatched_fingerprint_is_refused():
    p = make("dummy:qwen3-tiny", "prefill")
    d = make("dummy:qwen3-moe-tiny", "decode", timeout=5)
    try:
        _, out = asyncio.run(disagg(p, d, "x", prompts((20,))[0], "read"))
        assert out.finish_reason == "error"
        assert "fingerprint" in out.error and "same model" in out.error
        assert d.engine.connector.stats.handshake_failures >= 1
        wait_blocks_free(d)
    finally:
        close(p, d)


def test_unread_prefill_blocks_are_reclaimed_after_the_lease():
    p = make("dummy:qwen3-tiny", "prefill", lease=0.3)
    try:
        _, out = asyncio.run(run(p, "x", prompts((50,))[0], {"do_remote_decode": True}))
        assert len(out.kv_transfer_params.remote_block_ids) == 4
        assert p.stats.num_free_blocks < p.stats.num_total_blocks
        wait_blocks_free(p, timeout=5)
        assert p.engine.connector.stats.lease_expiries == 1
    finally:
        close(p)


def test_tcp_read_after_the_lease_is_refused():
    """Blocks freed at lease expiry may already hold another request's KV: a late tcp read of them
    is refused by the prefill's data server (the grant is gone), so the decode fails clearly
    instead of generating from someone else's KV."""
    p = make("dummy:qwen3-tiny", "prefill", lease=0.3)
    d = make("dummy:qwen3-tiny", "decode", transport="tcp", timeout=5)
    try:
        prompt = prompts((50,))[0]
        _, pout = asyncio.run(run(p, "x", prompt, {"do_remote_decode": True}))
        wait_blocks_free(p, timeout=5)
        _, out = asyncio.run(run(d, "x", prompt, pout.kv_transfer_params))
        assert out.finish_reason == "error"
        assert "not granted" in out.error or "no blocks are granted" in out.error
        wait_blocks_free(p, d)
    finally:
        close(p, d)


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_kv_that_never_arrives(policy):
    """The prefill instance vanished after answering: fail clearly, or recompute locally."""
    s = make("dummy:qwen3-tiny")
    p = make("dummy:qwen3-tiny", "prefill")
    d = make("dummy:qwen3-tiny", "decode", timeout=1.0, policy=policy)
    try:
        prompt = prompts((40,))[0]
        ref, _ = asyncio.run(run(s, "x", prompt))
        _, pout = asyncio.run(run(p, "x", prompt, {"do_remote_decode": True}))
        close(p)  # the peer is gone before decode reads
        got, out = asyncio.run(run(d, "x", prompt, pout.kv_transfer_params))
        if policy == "fail":
            assert out.finish_reason == "error" and "KV transfer" in out.error
        else:
            assert out.error is None and got == ref
        assert d.engine.connector.stats.load_failures == 1
        wait_blocks_free(d)
    finally:
        close(s, d)


def _write_prefill_params(decode: AsyncEngine) -> dict:
    c = decode.engine.connector
    return {
        "do_remote_decode": True,
        "transfer_mode": "WRITE",
        "remote_host": c.host,
        "remote_engine_id": c.engine_id,
        "remote_handshake_port": c.handshake_port,
        "remote_notify_port": c.notify_port,
    }


def _held(e: AsyncEngine) -> int:
    return e.stats.num_total_blocks - e.stats.num_free_blocks


def test_write_halves_given_up_on_free_the_other_sides_blocks():
    """WRITE, the proxy drops one half: the other side's blocks come back at once, not after the lease
    (30 s here) or the transfer timeout. (1) A prefill that answered, whose decode half never came: the
    proxy's `Abort` frees it. (2) That `Abort` overtaking its request: the request is not held when it
    finishes. (3) A decode request that ends before it had blocks (so before `write_dest`) tells the
    prefill; (4) one that ends after it (quarantined) gets its blocks back once the prefill confirms."""
    tiny = "dummy:qwen3-tiny"
    p = make(tiny, "prefill", "write")
    d = make(tiny, "decode", "write", blocks=8)  # room for one 80-token prompt (5 blocks), not two
    sender = NotifySender(zmq.Context.instance())
    pc = p.engine.connector
    a, b, c, e = prompts((40, 40, 80, 80), seed=7)

    async def main():
        _, out = await run(p, "held", a, _write_prefill_params(d))
        assert out.kv_transfer_params is not None
        await until_true(lambda: _held(p) == 3, 2.0)  # kept for a write_dest (stats lag the output a little)
        sender.send(pc.host, pc.notify_port, Abort("held", PROXY_ENGINE_ID, "decode half failed"))
        await until_true(lambda: _held(p) == 0, 2.0)

        sender.send(pc.host, pc.notify_port, Abort("early", PROXY_ENGINE_ID, "decode half failed"))
        await asyncio.sleep(0.2)  # handled while the request has not arrived yet
        _, out = await run(p, "early", b, _write_prefill_params(d))
        assert out.finish_reason == "length" and out.kv_transfer_params is None
        await until_true(lambda: _held(p) == 0, 2.0)

        first = asyncio.ensure_future(run(d, "first", e, write_params(p)))  # its prefill half never comes
        await until_true(lambda: _held(d) == 5, 2.0)
        second = asyncio.ensure_future(run(d, "second", c, write_params(p)))  # no blocks left for it
        await run(p, "second", c, _write_prefill_params(d))
        await until_true(lambda: _held(p) == 5, 2.0)
        second.cancel()  # the client (or the proxy) drops the decode half: the prefill is told
        await until_true(lambda: _held(p) == 0, 2.0)
        first.cancel()  # quarantined until the prefill confirms nothing more will be written
        await until_true(lambda: _held(d) == 0, 2.0)
        await asyncio.gather(first, second, return_exceptions=True)

        # A decode's abort of a request the prefill never saw leaves nothing behind that would stop
        # the push of a later request with that id.
        sender.send(pc.host, pc.notify_port, Abort("again", "a-decode-engine", "decode request ended"))
        await asyncio.sleep(0.2)
        toks, out = await disagg(p, d, "again", a, "write")
        assert out.error is None and out.finish_reason == "length" and len(toks) == GREEDY.max_tokens

    try:
        asyncio.run(main())
        wait_blocks_free(p, d, timeout=1)
        assert pc.stats.lease_expiries == 0 and d.engine.connector.stats.load_failures == 0
    finally:
        sender.close()
        close(p, d)


def test_write_prefill_ending_after_write_dest_settles_a_quarantined_decode():
    """WRITE, the client walks away from both halves at once: the prefill request ends (aborted)
    after decode's `write_dest` came but before decode's `Abort` does, while the decode request
    ended too and keeps its blocks until the transfer settles. The prefill must answer with
    `write_done {ok: false}` (which settles it), not an `Abort` (which a quarantine ignores, as it
    could overtake pushes): before, decode held the blocks until deadline + timeout (20 s here)."""
    tiny = "dummy:qwen3-tiny"
    p = make(tiny, "prefill", "write", blocks=8)
    d = make(tiny, "decode", "write")
    sender = NotifySender(zmq.Context.instance())
    pc = p.engine.connector
    a, x = prompts((80, 80), seed=11)

    async def main():
        await run(p, "held", a, _write_prefill_params(d))  # 5 of the prefill's 8 blocks, kept for a write_dest
        pre = asyncio.ensure_future(run(p, "x", x, _write_prefill_params(d)))  # waits: no room for 6 blocks
        dec = asyncio.ensure_future(run(d, "x", x, write_params(p)))
        await until_true(lambda: "x" in pc._dests, 2.0)  # decode's write_dest reached the prefill
        blocked = asyncio.ensure_future(p.call(lambda: time.sleep(0.5)))  # what follows meets in one gap
        await asyncio.sleep(0.05)
        pre.cancel()  # the prefill request ends first (its abort is next in the engine's inbox) ...
        dec.cancel()  # ... and decode's request ends during its transfer: quarantined, Abort sent
        await asyncio.gather(pre, dec, return_exceptions=True)
        await blocked
        await until_true(lambda: _held(d) == 0, 2.0)
        sender.send(pc.host, pc.notify_port, Abort("held", PROXY_ENGINE_ID, "done"))

    try:
        asyncio.run(main())
        wait_blocks_free(p, d, timeout=2)
    finally:
        sender.close()
        close(p, d)


async def until_true(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", ["read", "write"])
def test_random_aborts_and_a_dead_peer_leak_nothing(mode):
    p = make("dummy:qwen3-tiny", "prefill", mode, lease=2.0)
    d = make("dummy:qwen3-tiny", "decode", mode, timeout=2.0)
    rng = random.Random(0)

    async def one(i: int):
        prompt = prompts((rng.randint(2, 90),), seed=i)[0]
        sp = SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.0, ignore_eos=True)
        task = asyncio.ensure_future(disagg(p, d, f"r{i}", prompt, mode, sp))
        if rng.random() < 0.3:  # the client walks away at a random moment
            await asyncio.sleep(rng.random() * 0.05)
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def main():
        await asyncio.gather(*(one(i) for i in range(100)))

    try:
        asyncio.run(main())
        wait_blocks_free(p, d)
    finally:
        close(p)
    # Now the prefill peer is dead: decode requests that reference it must end, not hang.
    try:
        async def orphaned():
            prm = write_params(p) if mode == "write" else {
                "do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_block_ids": [0, 1],
                "remote_handshake_port": p.engine.connector.handshake_port,
                "remote_notify_port": p.engine.connector.notify_port}
            return await asyncio.gather(*(run(d, f"o{i}", prompts((20,))[0], prm) for i in range(5)))

        outs = asyncio.run(asyncio.wait_for(orphaned(), timeout=60))
        assert all(o.finish_reason == "error" for _, o in outs)
        wait_blocks_free(d)
    finally:
        close(d)
