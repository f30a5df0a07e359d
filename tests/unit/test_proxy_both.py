"""Both instances (`--role both`) in the proxy's table: registration, static URLs, candidates, picks."""

from __future__ import annotations

from pdserve.kv.messages import Register, decode_register, encode
from pdserve.proxy.instances import InstanceTable
from pdserve.proxy.routing import LeastLoaded
from pdserve.proxy.settings import ProxySettings


def _reg(port: int, role: str, mode: str = "READ") -> Register:
    return Register(role=role, request_address=f"127.0.0.1:{port}", handshake_port=port + 100,  # type: ignore[arg-type]
                    notify_port=port + 200, transfer_mode=mode, engine_id=f"e{port}")  # type: ignore[arg-type]


def test_both_registers_in_either_kv_mode_and_is_a_candidate_of_both_halves() -> None:
    for kv_mode in ("READ", "WRITE"):
        table = InstanceTable(ProxySettings(kv_mode=kv_mode))  # type: ignore[arg-type]
        # A both instance's transfer_mode is only its default: it is admitted by either proxy.
        b = table.register(decode_register(encode(_reg(8001, "B", "READ"))))
        p = table.register(_reg(8002, "P", kv_mode))
        d = table.register(_reg(8003, "D", kv_mode))
        assert b is not None and p is not None and d is not None and b.role == "B"
        assert set(table.candidates("P")) == {b, p}
        assert set(table.candidates("D")) == {b, d}
        assert table.candidates("P", {"127.0.0.1:8001"}) == [p]
    standard = InstanceTable(ProxySettings(mode="standard"))
    assert standard.register(_reg(8001, "B")) is None


def test_single_roles_still_checked_against_the_proxys_mode() -> None:
    table = InstanceTable(ProxySettings(kv_mode="WRITE"))
    assert table.register(_reg(8001, "P", "READ")) is None
    assert table.register(_reg(8002, "D", "WRITE")) is not None


def test_one_url_as_prefill_and_decode_is_a_both_instance() -> None:
    url = "http://127.0.0.1:9001"
    table = InstanceTable(ProxySettings(prefill=(url, "http://127.0.0.1:9002"), decode=(url,), registry_port=None))
    roles = {i.address: i.role for i in table.all()}
    assert roles == {"127.0.0.1:9001": "B", "127.0.0.1:9002": "P"}


def test_least_loaded_balances_a_pool_of_both_instances() -> None:
    """The pair pick as the orchestrator makes it: decode by load, prefill by load among the others."""
    table = InstanceTable(ProxySettings())
    a, b = (table.register(_reg(port, "B")) for port in (8001, 8002))
    assert a is not None and b is not None
    picker = LeastLoaded()
    halves = {a.address: [0, 0], b.address: [0, 0]}
    for _ in range(10):
        decode = picker.pick("D", table.candidates("D"))
        assert decode is not None
        table.acquire(decode)  # decodes stay in flight (long), prefills end at once
        prefill = picker.pick("P", table.candidates("P", {decode.address}))
        assert prefill is not None and prefill is not decode
        halves[decode.address][1] += 1
        halves[prefill.address][0] += 1
    assert halves == {a.address: [5, 5], b.address: [5, 5]}


def test_topology_of_both_instances() -> None:
    from pdserve.launch import TopologySpec, parse_topology, proxy_argv

    spec = parse_topology("disagg-write:2b", "dummy:qwen3-tiny")
    assert (spec.prefill, spec.decode, spec.both, spec.kv_mode) == (0, 0, 2, "write")
    assert spec.roles == ("both", "both")
    assert proxy_argv(spec, 1, 2)[-2:] == ["--routing", "least-loaded"]
    mixed = parse_topology("disagg-read:1p1d1b", "m")
    assert mixed.roles == ("prefill", "decode", "both") and mixed.label == "disagg-read:1p1d1b"
    assert TopologySpec(kind="disagg", model="m", prefill=0, decode=0, both=2).label == "disagg-write:2b"
    assert TopologySpec(kind="disagg", model="m").label == "disagg-write"
    for bad in ("disagg-write:0b", "disagg-write:1p0d"):
        try:
            parse_topology(bad, "m")
        except ValueError:
            continue
        raise AssertionError(bad)
