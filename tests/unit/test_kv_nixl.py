"""The NIXL transport on real NIXL agents (UCX over loopback and shared memory): blocks READ and
WRITTEN byte for byte between caches of one process and of two processes, engines exchanging KV
with `--kv-transport nixl`, and a peer killed with SIGKILL failing the transfer within its timeout
with every block freed."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid

import httpx
import msgspec
import pytest
import torch

from pdserve.engine.kv_cache import KVCache, KVLayout
from pdserve.kv.messages import NixlDescriptor
from pdserve.kv.transports.base import TransferError
from tests.e2e.conftest import pdserve_server
from tests.unit.test_kv_transfer import close, disagg, make, prompts, run, wait_blocks_free

if importlib.util.find_spec("nixl_cu12") is None and importlib.util.find_spec("nixl") is None:
    pytest.skip("NIXL is not installed (pip install 'pdserve[nixl]')", allow_module_level=True)

from pdserve.kv.transports.nixl import NixlAgent, NixlTransport, ucx_net_device  # noqa: E402

TINY = "dummy:qwen3-tiny"
# Several runs on both sides, a lone block, and runs that are consecutive on one side only.
SRC = [0, 1, 2, 9, 10, 30, 5, 6, 7, 8, 39]
DST = [3, 4, 5, 20, 21, 0, 40, 41, 42, 43, 47]


def _layout(num_blocks: int) -> KVLayout:
    return KVLayout(3, num_blocks, 16, 2, 8, torch.float32)


def _filled(layout: KVLayout, seed: int) -> KVCache:
    cache = KVCache(layout, torch.device("cpu"))
    cache.tensor.copy_(torch.randn(layout.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def test_read_and_write_between_two_agents_of_one_process():
    a, b = _filled(_layout(40), 1), _filled(_layout(48), 2)
    pa, pb = NixlAgent("nixl-a", a.tensor, "127.0.0.1"), NixlAgent("nixl-b", b.tensor, "127.0.0.1")
    try:
        before = b.tensor.clone()
        reader = NixlTransport(pb, b.tensor, pa.descriptor(), a.layout.shape, 5.0)
        assert reader.read(SRC, DST, request_id="r") == len(SRC) * 3 * a.layout.block_bytes
        assert torch.equal(b.tensor[:, DST], a.tensor[:, SRC])
        untouched = [i for i in range(48) if i not in DST]
        assert torch.equal(b.tensor[:, untouched], before[:, untouched])

        b.tensor.copy_(before)
        writer = NixlTransport(pa, a.tensor, pb.descriptor(), b.layout.shape, 5.0)
        for layer in (2, 0):  # layer by layer, as prefill pushes; layer 1 is not written
            assert writer.write_layer(layer, SRC, DST, request_id="w") == len(SRC) * a.layout.block_bytes
        assert torch.equal(b.tensor[[0, 2]][:, DST], a.tensor[[0, 2]][:, SRC])
        assert torch.equal(b.tensor[1], before[1])
        assert torch.equal(b.tensor[:, untouched], before[:, untouched])

        with pytest.raises(TransferError, match="out of range"):
            reader.read([40], [0], request_id="r")
        with pytest.raises(TransferError, match="out of range"):
            writer.write_layer(0, [0], [48], request_id="w")
        reader.close()
        writer.close()
    finally:
        pa.close()
        pb.close()


def test_kv_host_confines_ucx_to_its_interface():
    assert ucx_net_device("127.0.0.1") == "lo"
    assert ucx_net_device("0.0.0.0") is None  # a wildcard --kv-host: UCX's defaults
    with pytest.raises(RuntimeError, match="no network interface"):
        ucx_net_device("203.0.113.77")  # TEST-NET-3: held by no interface here


# ---- a peer in another process ----------------------------------------------------------------
def _peer(conn, num_blocks: int, seed: int) -> None:
    """Child: a filled cache behind a NIXL agent; answers "dump" with its bytes until "exit"."""
    cache = _filled(_layout(num_blocks), seed)
    agent = NixlAgent(f"peer-{os.getpid()}", cache.tensor, "127.0.0.1")
    conn.send_bytes(msgspec.msgpack.encode(agent.descriptor()))
    while (cmd := conn.recv()) != "exit":
        if cmd == "dump":
            conn.send_bytes(cache.tensor.numpy().tobytes())
    agent.close()


def _start_peer(num_blocks: int, seed: int):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peer, args=(child, num_blocks, seed), daemon=True)
    proc.start()
    assert parent.poll(60), "the peer process did not start"
    return proc, parent, msgspec.msgpack.decode(parent.recv_bytes(), type=NixlDescriptor)


def test_read_and_write_between_two_processes():
    proc, conn, desc = _start_peer(40, seed=7)
    local = _filled(_layout(48), 8)
    agent = NixlAgent("local", local.tensor, "127.0.0.1")
    try:
        t = NixlTransport(agent, local.tensor, desc, _layout(40).shape, 10.0)
        peer_kv = _filled(_layout(40), 7).tensor  # what the child holds
        t.read(SRC, DST, request_id="r")
        assert torch.equal(local.tensor[:, DST], peer_kv[:, SRC])

        local.tensor.normal_()
        for layer in range(3):
            t.write_layer(layer, DST, SRC, request_id="w")  # ours -> the peer's
        conn.send("dump")
        got = torch.frombuffer(bytearray(conn.recv_bytes()), dtype=torch.float32).view(_layout(40).shape)
        assert torch.equal(got[:, SRC], local.tensor[:, DST])
        others = [i for i in range(40) if i not in SRC]
        assert torch.equal(got[:, others], peer_kv[:, others])
        t.close()
        conn.send("exit")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        agent.close()


@pytest.mark.parametrize("op", ["read", "write"])
def test_a_killed_peer_fails_the_transfer_within_the_timeout(op):
    proc, _, desc = _start_peer(40, seed=3)
    local = _filled(_layout(48), 4)
    agent = NixlAgent("survivor", local.tensor, "127.0.0.1")
    timeout = 5.0
    try:
        t = NixlTransport(agent, local.tensor, desc, _layout(40).shape, timeout)
        t.read([0, 1], [0, 1], request_id="warm")  # connected
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="NIXL"):
            for _ in range(100):  # the first op after the kill may still be in the sockets' buffers
                if op == "read":
                    t.read(SRC, DST, request_id="r")
                else:
                    t.write_layer(0, DST, SRC, request_id="w")
                time.sleep(0.05)
        assert time.monotonic() - t0 < timeout + 1.0
        t.close()
    finally:
        agent.close()


def _wait_stopped(pid: int, timeout: float = 30.0) -> None:
    """Wait until every thread of `pid` is stopped. kill(SIGSTOP) returns before they are: the group
    stop begins when the thread picked for the signal next runs, and until then another (UCX's
    progress thread) may still serve a transfer, which a loaded machine can delay for long."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if states and all(s == "T" for s in states):
            return
        assert time.monotonic() < deadline, f"the peer's threads did not stop: {states}"
        time.sleep(0.01)


def test_a_stopped_peer_fails_the_transfer_at_the_timeout(monkeypatch):
    """A peer that hangs (SIGSTOP) never completes a transfer that needs its CPU (UCX over tcp
    only: emulated RMA): the poll gives up at the deadline and cancels the transfer."""
    monkeypatch.setenv("UCX_TLS", "tcp")  # read by UCX when our agent is made (shm would not need the peer)
    proc, _, desc = _start_peer(40, seed=3)
    local = _filled(_layout(48), 4)
    agent = NixlAgent("waiter", local.tensor, "127.0.0.1")
    timeout = 2.0
    try:
        t = NixlTransport(agent, local.tensor, desc, _layout(40).shape, timeout)
        t.read([0, 1], [0, 1], request_id="warm")
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_stopped(proc.pid)
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="timed out"):
            t.read(list(range(40)), list(range(40)), request_id="r")
        assert timeout <= time.monotonic() - t0 < timeout + 1.0
        t.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        agent.close()


# ---- engines ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["read", "write"])
def test_engines_over_nixl_equal_standalone(mode):
    s, p, d = make(TINY), make(TINY, "prefill", mode, "nixl"), make(TINY, "decode", mode, "nixl")
    try:
        async def main():
            for i, prompt in enumerate(prompts()):
                ref, _ = await run(s, f"r{i}", prompt)
                got, out = await disagg(p, d, f"r{i}", prompt, mode)
                assert out.error is None and got == ref, f"prompt of {len(prompt)} tokens"

        asyncio.run(main())
        moved = (d if mode == "read" else p).engine.connector.stats.bytes_moved
        assert moved > 0
        transports = list((d if mode == "read" else p).engine.connector.ctx.transports.values())
        assert [type(t) for t in transports] == [NixlTransport]
        wait_blocks_free(s, p, d)
    finally:
        close(s, p, d)


def test_nixl_on_one_side_only_is_refused_clearly():
    p, d = make(TINY, "prefill", "read", "shm"), make(TINY, "decode", "read", "nixl")
    try:
        async def main():
            _, pout = await run(p, "x", prompts((20,))[0], {"do_remote_decode": True})
            return await run(d, "x", prompts((20,))[0], pout.kv_transfer_params)

        _, out = asyncio.run(main())
        assert out.finish_reason == "error" and "no NIXL transport" in (out.error or "")
        wait_blocks_free(p, d)
    finally:
        close(p, d)


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_read_from_a_killed_prefill_process_frees_every_block(tmp_path, policy):
    """A prefill `pdserve serve` process, SIGKILLed after answering a prefill half: the decode's NIXL
    READ fails within the transfer timeout; the request fails (or is recomputed) and no block leaks."""
    timeout = 4.0
    d = make(TINY, "decode", "read", "nixl", timeout=timeout, policy=policy)
    s = make(TINY)
    body = {"model": TINY, "max_tokens": 1, "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}}
    try:
        with pdserve_server(tmp_path, "--role", "prefill", "--kv-mode", "read", "--kv-transport", "nixl",
                            "--max-num-batched-tokens", "32", "--dtype", "float32") as p:
            def prefill_half(prompt: list[int]) -> dict:
                r = httpx.post(f"{p.base_url}/v1/completions", json={**body, "prompt": prompt},
                               headers={"X-Request-Id": uuid.uuid4().hex}, timeout=60)
                assert r.status_code == 200, r.text
                return r.json()["kv_transfer_params"]

            first, second = prompts((37, 70), seed=5)
            toks, out = asyncio.run(run(d, "warm", first, prefill_half(first)))  # handshake, NIXL connected
            assert out.error is None and toks == asyncio.run(run(s, "warm", first))[0]
            params = prefill_half(second)
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait(10)
            t0 = time.monotonic()
            toks, out = asyncio.run(asyncio.wait_for(run(d, "orphan", second, params), 60))
            elapsed = time.monotonic() - t0
        if policy == "fail":
            assert out.finish_reason == "error" and "NIXL READ" in (out.error or "") and elapsed < timeout + 2.0
        else:
            assert out.error is None and toks == asyncio.run(run(s, "ref", second))[0]
        assert d.engine.connector.stats.load_failures == 1
        wait_blocks_free(d, s)
    finally:
        close(d, s)


def test_write_to_a_killed_decode_process_frees_every_block(tmp_path):
    """A decode `pdserve serve` process that sent its write_dest, SIGKILLed before the prefill pushes:
    the prefill's NIXL WRITE fails at once (not at the lease) and its blocks are freed."""
    p = make(TINY, "prefill", "write", "nixl", timeout=4.0, lease=60.0)
    pc = p.engine.connector
    to_d = {"do_remote_prefill": True, "transfer_mode": "WRITE", "remote_engine_id": pc.engine_id,
            "remote_host": pc.host, "remote_handshake_port": pc.handshake_port, "remote_notify_port": pc.notify_port}
    try:
        with pdserve_server(tmp_path, "--role", "decode", "--kv-mode", "write", "--kv-transport", "nixl",
                            "--max-num-batched-tokens", "32", "--dtype", "float32") as d:
            status: dict[str, int] = {}

            def decode_half(rid: str, prompt: list[int]) -> None:
                with contextlib.suppress(httpx.HTTPError):  # the orphan's server is killed under it
                    status[rid] = httpx.post(
                        f"{d.base_url}/v1/completions", headers={"X-Request-Id": rid}, timeout=60,
                        json={"model": TINY, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                              "kv_transfer_params": to_d}).status_code

            first, second = prompts((37, 70), seed=6)
            warm = threading.Thread(target=decode_half, args=("warm", first))
            warm.start()
            _, out = asyncio.run(run(p, "warm", first, {"do_remote_decode": True, "transfer_mode": "WRITE"}))
            warm.join(60)
            assert status.get("warm") == 200, "the warm decode half failed"
            # Decode may answer before our engine thread has taken the push's result (the worker sends
            # write_done first): wait for it, handshake done, NIXL connected.
            deadline = time.monotonic() + 30
            while pc.stats.transfers < 1:
                assert time.monotonic() < deadline, "the warm push was never recorded"
                time.sleep(0.01)
            assert pc.stats.transfers == 1

            orphan = threading.Thread(target=decode_half, args=("orphan", second))
            orphan.start()
            deadline = time.monotonic() + 30
            while "orphan" not in pc._dests:  # decode's write_dest is here, before the prefill half
                assert time.monotonic() < deadline, "no write_dest from the decode"
                time.sleep(0.01)
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            orphan.join(60)
            t0 = time.monotonic()
            _, out = asyncio.run(run(p, "orphan", second, {"do_remote_decode": True, "transfer_mode": "WRITE"}))
            wait_blocks_free(p, timeout=10.0)
            assert time.monotonic() - t0 < 10.0  # the push failed; the 60 s lease did not free them
            assert pc.stats.transfers == 1
            assert not pc.ctx.transports  # the failed NIXL WRITE dropped its transport
    finally:
        close(p)
