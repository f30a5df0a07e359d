"""Registration: the instance table, and the real ZMQ ROUTER fed by a real DEALER socket."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import pytest
import zmq

from pdserve.kv.messages import Register, encode
from pdserve.proxy.instances import InstanceTable, split_url
from pdserve.proxy.registry import RegistryServer, sweep_forever
from pdserve.proxy.settings import ProxySettings


def _reg(port: int, role: str = "D", mode: str = "READ", engine: str = "e1", token: str | None = None) -> Register:
    return Register(role=role, request_address=f"127.0.0.1:{port}", handshake_port=port + 100,  # type: ignore[arg-type]
                    notify_port=port + 200, transfer_mode=mode, engine_id=engine, token=token)  # type: ignore[arg-type]


# -- the table --------------------------------------------------------------------------------


def test_split_url() -> None:
    assert split_url("http://127.0.0.1:8001/") == ("http", "127.0.0.1:8001")
    assert split_url("https://h:8443") == ("https", "h:8443")
    assert split_url("host:1") == ("http", "host:1")
    for bad in ("127.0.0.1", "http://h:x", "h:0", "h:70000", "http://h:1/v1"):
        with pytest.raises(ValueError):
            split_url(bad)


def test_register_refresh_evict_readmit() -> None:
    table = InstanceTable(ProxySettings(heartbeat_timeout_s=3.0))
    inst = table.register(_reg(8001), now=100.0)
    assert inst is not None and inst.healthy and inst.kv_ready
    assert (inst.kv_host, inst.handshake_port, inst.notify_port) == ("127.0.0.1", 8101, 8201)
    assert table.register(_reg(8001), now=102.0) is inst
    assert table.sweep(now=104.0) == []  # 2 s silent < 3 s
    assert table.sweep(now=105.5) == [inst] and not inst.healthy
    assert table.candidates("D") == []
    assert table.register(_reg(8001, engine="e2"), now=106.0) is inst  # re-admitted, restarted engine
    assert inst.healthy and inst.engine_id == "e2" and table.candidates("D") == [inst]


def test_eviction_aborts_calls_in_flight() -> None:
    async def main() -> None:
        table = InstanceTable(ProxySettings())
        inst = table.register(_reg(8001), now=0.0)
        assert inst is not None
        lease = table.acquire(inst)
        with anyio.CancelScope() as scope:
            lease.scope = scope
            assert inst.in_flight == 1
            table.sweep(now=10.0)
            await asyncio.sleep(1)  # cancelled at once
        assert scope.cancelled_caught
        assert lease.lost is not None and "evicted" in lease.lost
        table.release(lease)
        assert inst.in_flight == 0

    asyncio.run(asyncio.wait_for(main(), 2))


def test_long_dead_instances_are_forgotten() -> None:
    table = InstanceTable(ProxySettings(heartbeat_timeout_s=1.0))
    table.register(_reg(8001), now=0.0)
    table.sweep(now=2.0)
    assert len(table.all()) == 1
    table.sweep(now=100.0)
    assert table.all() == []


def test_mode_and_role_mismatches_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    table = InstanceTable(ProxySettings(kv_mode="READ"))
    assert table.register(_reg(8001, mode="WRITE")) is None
    assert table.register(_reg(8002, role="S")) is None
    assert table.all() == []
    assert "differs from the proxy's --kv-mode READ" in caplog.text
    assert "role standalone does not belong to a disagg proxy" in caplog.text
    caplog.clear()
    table.register(_reg(8001, mode="WRITE"))
    assert caplog.text == ""  # the same refusal is logged once
    standard = InstanceTable(ProxySettings(mode="standard"))
    assert standard.register(_reg(8001, role="P")) is None
    assert standard.register(_reg(8003, role="S", mode="WRITE")) is not None  # modes don't matter there


def test_write_mode_needs_kv_coordinates() -> None:
    table = InstanceTable(ProxySettings(kv_mode="WRITE"))
    table.register(Register(role="D", request_address="127.0.0.1:8001", transfer_mode="WRITE"))
    assert table.candidates("D") == []  # no engine id / ports: cannot be paired
    table.register(_reg(8002, mode="WRITE"))
    assert [i.address for i in table.candidates("D")] == ["127.0.0.1:8002"]


def test_static_instances_and_exclusion() -> None:
    table = InstanceTable(ProxySettings(prefill=("http://127.0.0.1:9001",), decode=("127.0.0.1:9002",)))
    p, d = table.get("127.0.0.1:9001"), table.get("127.0.0.1:9002")
    assert p is not None and d is not None and p.static and p.role == "P" and d.role == "D"
    assert table.candidates("P") == []  # unhealthy until a health check passes
    table.set_health(p, True)
    assert table.candidates("P") == [p] and table.candidates("P", {p.address}) == []
    table.sweep(now=1e9)  # static instances are not evicted by heartbeats
    assert p.healthy


# -- the ZMQ registry -------------------------------------------------------------------------


async def _until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def _with_registry(
    settings: ProxySettings, body: Callable[[RegistryServer, zmq.Socket], Awaitable[None]]
) -> None:
    async def main() -> None:
        table = InstanceTable(settings)
        server = RegistryServer(table, "127.0.0.1", 0, settings.registry_token)
        port = server.bind()
        tasks = [asyncio.create_task(server.serve_forever()), asyncio.create_task(sweep_forever(table, 0.05))]
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        try:
            await body(server, dealer)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            dealer.close()
            ctx.term()
            server.close()

    asyncio.run(main())


def test_zmq_register_heartbeat_evict_readmit() -> None:
    async def body(server: RegistryServer, dealer: zmq.Socket) -> None:
        table = server.table
        dealer.send(encode(_reg(8001)))
        await _until(lambda: bool(table.candidates("D")))
        inst = table.candidates("D")[0]
        assert inst.engine_id == "e1" and not inst.static
        for _ in range(4):  # heartbeats keep it in
            await asyncio.sleep(0.1)
            dealer.send(encode(_reg(8001)))
        assert inst.healthy
        await _until(lambda: not inst.healthy, timeout=2.0)  # silence > 0.3 s: evicted
        dealer.send(encode(_reg(8001, engine="e2")))
        await _until(lambda: inst.healthy)
        assert inst.engine_id == "e2" and server.stats.accepted == 6

    _with_registry(ProxySettings(heartbeat_timeout_s=0.3), body)


def test_zmq_vllm_moriio_form() -> None:
    async def body(server: RegistryServer, dealer: zmq.Socket) -> None:
        msg = {"type": "P", "http_address": "127.0.0.1:8100", "zmq_address": "127.0.0.1:0,handshake:7100,notify:7200",
               "dp_size": 1, "tp_size": 1, "transfer_mode": "READ"}
        dealer.send(msgspec.msgpack.encode(msg))
        await _until(lambda: bool(server.table.candidates("P")))
        inst = server.table.candidates("P")[0]
        assert (inst.address, inst.handshake_port, inst.notify_port) == ("127.0.0.1:8100", 7100, 7200)

    _with_registry(ProxySettings(), body)


def test_zmq_malformed_messages_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def body(server: RegistryServer, dealer: zmq.Socket) -> None:
        for junk in (b"", b"\xff\x00garbage", msgspec.msgpack.encode({"type": "register"}),
                     msgspec.msgpack.encode([1, 2, 3]), msgspec.msgpack.encode({"type": "register", "role": "X",
                                                                                "request_address": "a:1"})):
            dealer.send(junk)
        dealer.send_multipart([b"two", b"frames"])
        dealer.send(encode(_reg(8001)))  # still alive afterwards
        await _until(lambda: bool(server.table.candidates("D")))
        assert server.stats.malformed == 6 and server.stats.accepted == 1

    _with_registry(ProxySettings(), body)
    assert "malformed registration dropped" in caplog.text


def test_zmq_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def body(server: RegistryServer, dealer: zmq.Socket) -> None:
        dealer.send(encode(_reg(8001)))  # no token
        dealer.send(encode(_reg(8002, token="wrong")))
        dealer.send(encode(_reg(8003, token="s3cret")))
        await _until(lambda: bool(server.table.candidates("D")))
        await asyncio.sleep(0.05)
        assert [i.address for i in server.table.candidates("D")] == ["127.0.0.1:8003"]
        assert server.stats.refused == 2

    _with_registry(ProxySettings(registry_token="s3cret"), body)
    assert "wrong or missing registry token" in caplog.text


def test_zmq_mismatched_transfer_mode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def body(server: RegistryServer, dealer: zmq.Socket) -> None:
        dealer.send(encode(_reg(8001, mode="READ")))
        dealer.send(encode(_reg(8002, mode="WRITE")))
        await _until(lambda: server.stats.accepted + server.stats.refused == 2)
        assert [i.address for i in server.table.candidates("D")] == ["127.0.0.1:8002"]

    _with_registry(ProxySettings(kv_mode="WRITE"), body)
    assert "transfer_mode READ differs from the proxy's --kv-mode WRITE" in caplog.text


def test_bind_conflict_is_a_clear_error() -> None:
    table = InstanceTable(ProxySettings())
    first = RegistryServer(table, "127.0.0.1", 0)
    port = first.bind()
    second = RegistryServer(table, "127.0.0.1", port)
    try:
        with pytest.raises(OSError, match="cannot bind the registry"):
            second.bind()
    finally:
        first.close()
        second.close()
