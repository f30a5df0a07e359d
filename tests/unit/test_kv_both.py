"""The both role (vLLM's kv_both): two engines that each prefill for the other, over real sockets.

Each engine runs its real step-loop thread; the test plays the proxy's part, as test_kv_transfer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import msgspec
import pytest
import zmq

from pdserve.engine.async_engine import AsyncEngine
from pdserve.kv.messages import PROXY_ENGINE_ID, Abort
from pdserve.kv.notify import NotifySender
from pdserve.server.app import build_app
from pdserve.server.context import ServerContext
from pdserve.server.settings import ServerSettings
from tests.unit.test_kv_transfer import (
    GREEDY,
    close,
    disagg,
    make,
    prompts,
    run,
    until_true,
    wait_blocks_free,
    write_params,
)

TINY = "dummy:qwen3-tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sockets(e: AsyncEngine) -> tuple[int, int, int]:
    c = e.engine.connector
    return c.handshake_port, c.notify_port, c.tcp_server.port


@pytest.mark.parametrize("mode", ["read", "write"])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_both_instances_prefill_for_each_other(mode, transport):
    s = make(TINY)
    a, b = make(TINY, "both", mode, transport), make(TINY, "both", mode, transport)
    try:
        conn = a.engine.connector
        assert conn.role == "both"
        # One context (sockets, worker, engine id), shared by both halves (nothing opened twice).
        for half in (conn.producer, conn.consumer):
            assert half.ctx is conn.ctx
            assert half.engine_id == conn.engine_id and half.tcp_server is conn.tcp_server

        async def main():
            for i, prompt in enumerate(prompts()):
                ref, _ = await run(s, f"r{i}", prompt)
                # A prefills for B, then B prefills for A; a plain request on each runs locally.
                for p, d, tag in ((a, b, "ab"), (b, a, "ba")):
                    got, out = await disagg(p, d, f"{tag}{i}", prompt, mode)
                    assert out.error is None and out.finish_reason == "length"
                    assert got == ref, f"{tag}: prompt of {len(prompt)} tokens"
                plain, out = await run(a, f"plain{i}", prompt)
                assert plain == ref and out.kv_transfer_params is None

        asyncio.run(main())
        n = len(prompts())
        for e in (a, b):
            st = e.engine.connector.stats
            assert (st.prefill_halves, st.decode_halves) == (n, n)
        assert a.engine.connector.stats.bytes_moved > 0 and b.engine.connector.stats.bytes_moved > 0
        wait_blocks_free(s, a, b)
    finally:
        close(s, a, b)


@pytest.mark.parametrize("mode", ["read", "write"])
def test_both_pairs_with_single_role_instances(mode):
    """A both instance is a prefill for a decode instance and a decode for a prefill instance."""
    s, x = make(TINY), make(TINY, "both", mode)
    p, d = make(TINY, "prefill", mode), make(TINY, "decode", mode)
    try:
        prompt = prompts((40,))[0]

        async def main():
            ref, _ = await run(s, "r", prompt)
            for pre, dec, rid in ((x, d, "x-d"), (p, x, "p-x")):
                got, out = await disagg(pre, dec, rid, prompt, mode)
                assert out.error is None and got == ref, rid

        asyncio.run(main())
        wait_blocks_free(x, p, d)
    finally:
        close(s, x, p, d)


def test_both_refuses_itself_as_peer_and_both_flags():
    a = make(TINY, "both", "write")
    try:
        prompt = prompts((20,))[0]
        with pytest.raises(ValueError, match="own peer"):
            a.engine.validate_request(prompt, GREEDY, write_params(a))
        with pytest.raises(ValueError, match="both do_remote_decode and do_remote_prefill"):
            a.engine.validate_request(prompt, GREEDY, {"do_remote_decode": True, "do_remote_prefill": True})
    finally:
        close(a)


def test_both_failures_and_aborts_leak_nothing():
    """A decode half whose transfer fails recomputes (policy) and tells its prefill half, which
    frees its blocks; a prefill half aborted by its client frees its blocks; a decode half that
    ends while waiting tells its prefill. Every block of both instances comes back."""
    a = make(TINY, "both", "read", timeout=2.0)
    b = make(TINY, "both", "read", timeout=2.0, policy="recompute")
    try:
        prompt = prompts((40,))[0]

        async def main():
            ref, _ = await run(b, "ref", prompt)
            # A prefills; B's handshake with it fails (a closed port): B recomputes, A is told.
            _, pout = await run(a, "x1", prompt, {"do_remote_decode": True})
            params = msgspec.to_builtins(pout.kv_transfer_params)
            params["remote_handshake_port"] = free_port()
            got, out = await run(b, "x1", prompt, params)
            assert out.error is None and got == ref
            await until_true(lambda: a.engine.connector.stats.blocks_held == 0, 10)
            # B as prefill, given up on by the proxy (its notify abort): B frees the blocks at once.
            await run(b, "x2", prompt, {"do_remote_decode": True})
            assert b.engine.connector.stats.blocks_held > 0
            cb = b.engine.connector
            ctx = zmq.Context()
            sender = NotifySender(ctx)
            try:
                sender.send(cb.host, cb.notify_port, Abort("x2", PROXY_ENGINE_ID, "test"))
                await until_true(lambda: cb.stats.blocks_held == 0, 10)
            finally:
                sender.close()
                ctx.term()
            # A as decode for a prefill on B, aborted while it waits for the KV: B is told and frees.
            _, pout = await run(b, "x3", prompt, {"do_remote_decode": True})
            assert cb.stats.blocks_held > 0
            before = a.engine.connector.stats.decode_halves
            task = asyncio.ensure_future(run(a, "x3", prompt, pout.kv_transfer_params))
            await until_true(lambda: a.engine.connector.stats.decode_halves > before, 10)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await until_true(lambda: cb.stats.blocks_held == 0, 10)

        asyncio.run(main())
        wait_blocks_free(a, b)
        assert a.engine.connector.stats.blocks_held == b.engine.connector.stats.blocks_held == 0
    finally:
        close(a, b)


def test_one_set_of_sockets():
    """Ports of a both instance are bound once: its halves report the same ones."""
    a = make(TINY, "both")
    try:
        conn = a.engine.connector
        assert _sockets(a) == (conn.producer.handshake_port, conn.consumer.notify_port, conn.consumer.tcp_server.port)
    finally:
        close(a)


def test_request_id_reused_across_directions_is_a_400_and_leaks_nothing():
    """An id a half still keeps state under (a prefill half holding its blocks for the read; a decode
    half waiting for its KV) is refused for a request in the other direction, or a plain one, with a
    400 naming X-Request-Id, before anything is allocated; and every block comes back."""
    a, b = make(TINY, "both", "read"), make(TINY, "both", "read")
    ctx = ServerContext(a, ServerSettings(served_model_names=(TINY,), role="both"))
    prompt = prompts((40,))[0]
    sender = NotifySender(zmq.Context.instance())

    async def main():
        transport = httpx.ASGITransport(app=build_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async def post(rid: str, kvp: object) -> httpx.Response:
                body = {"model": TINY, "prompt": prompt, "max_tokens": 4, "temperature": 0, "kv_transfer_params": kvp}
                return await client.post("/v1/completions", json=body, headers={"X-Request-Id": rid})

            def refused(r: httpx.Response, half: str) -> None:
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "request_id_in_use",
                                                                    "X-Request-Id")
                assert f"in use by this instance's {half} side" in err["message"]

            # A is the prefill half of "dup" and holds its blocks; a decode half or a plain request of that id
            # arrives before they are read.
            assert (await post("dup", {"do_remote_decode": True})).status_code == 200
            _, pout = await run(b, "dup", prompt, {"do_remote_decode": True})
            refused(await post("dup", msgspec.to_builtins(pout.kv_transfer_params)), "prefill")
            refused(await post("dup", None), "prefill")
            embedding = {"model": TINY, "input": "hello"}
            refused(await client.post("/v1/embeddings", json=embedding, headers={"X-Request-Id": "dup"}), "prefill")
            # Past the server (the engine's own API), the engine refuses it too, before allocating anything.
            _, out = await run(a, "dup", prompt, pout.kv_transfer_params)
            assert out.finish_reason == "error" and "in use by this instance's prefill side" in out.error
            # A decode half of "w" waits for its KV (its prefill never comes; the server no longer tracks it,
            # as after a quarantine): a prefill half of "w" is refused.
            waiting = asyncio.ensure_future(run(a, "w", prompt, write_params(b)))
            await until_true(lambda: a.engine.connector.consumer.serves("w"), 5)
            refused(await post("w", {"do_remote_decode": True}), "decode")
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        for e in (a, b):
            c = e.engine.connector
            sender.send(c.host, c.notify_port, Abort("dup", PROXY_ENGINE_ID, "test"))

    try:
        asyncio.run(main())
        wait_blocks_free(a, b, timeout=5)  # and check_integrity()
        assert a.engine.connector.stats.decode_halves == 1  # "w" only: no refused request became a half
    finally:
        sender.close()
        close(a, b)


def test_single_role_prefill_refuses_an_id_whose_blocks_it_holds():
    """A prefill instance keeps a finished half's blocks until the decode reads them: a second prefill
    half with that id is refused before allocating (it would overwrite the first one's entry and leak
    its blocks); the id is free again once the first transfer is over."""
    p = make(TINY, "prefill", "read")
    prompt = prompts((40,))[0]
    sender = NotifySender(zmq.Context.instance())

    async def main():
        await run(p, "dup", prompt, {"do_remote_decode": True})
        _, out = await run(p, "dup", prompt, {"do_remote_decode": True})
        assert out.finish_reason == "error" and "in use by this instance's prefill side" in out.error
        c = p.engine.connector
        sender.send(c.host, c.notify_port, Abort("dup", PROXY_ENGINE_ID, "test"))
        await until_true(lambda: not c.serves("dup"), 5)
        _, again = await run(p, "dup", prompt, {"do_remote_decode": True})
        assert again.finish_reason == "length"
        sender.send(c.host, c.notify_port, Abort("dup", PROXY_ENGINE_ID, "test"))

    try:
        asyncio.run(main())
        wait_blocks_free(p, timeout=5)
    finally:
        sender.close()
        close(p)
