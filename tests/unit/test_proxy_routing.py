"""Instance pickers: round-robin, least-loaded, prefix affinity; prompt keys."""

from __future__ import annotations

from collections import Counter

import pytest

from pdserve.proxy.instances import Instance, Lease
from pdserve.proxy.prefix_key import CHUNK_BYTES, prompt_key
from pdserve.proxy.routing import LeastLoaded, PrefixAffinity, RoundRobin, make_picker


def _inst(port: int, in_flight: int = 0) -> Instance:
    inst = Instance(address=f"127.0.0.1:{port}", role="D", static=True, healthy=True)
    for _ in range(in_flight):
        inst.leases.add(Lease(inst))
    return inst


def test_round_robin_spreads_evenly() -> None:
    pool = [_inst(8001), _inst(8002), _inst(8003)]
    rr = RoundRobin()
    picks = [rr.pick("D", pool).address for _ in range(9)]  # type: ignore[union-attr]
    assert Counter(picks) == {i.address: 3 for i in pool}
    assert picks[:3] == [i.address for i in pool]


def test_round_robin_survives_membership_changes() -> None:
    a, b, c = _inst(8001), _inst(8002), _inst(8003)
    rr = RoundRobin()
    assert rr.pick("D", [a, b, c]) is a
    assert rr.pick("D", [a, c]) is c  # b left: next after a is c
    assert rr.pick("D", [a, b, c]) is a  # wraps around
    assert rr.pick("D", [b]) is b


def test_round_robin_roles_are_independent() -> None:
    a, b = _inst(8001), _inst(8002)
    rr = RoundRobin()
    assert rr.pick("P", [a, b]) is a
    assert rr.pick("D", [a, b]) is a
    assert rr.pick("P", [a, b]) is b


def test_empty_candidates() -> None:
    assert RoundRobin().pick("D", []) is None
    assert LeastLoaded().pick("D", []) is None


def test_least_loaded_prefers_fewest_in_flight() -> None:
    a, b, c = _inst(8001, 3), _inst(8002, 1), _inst(8003, 2)
    ll = LeastLoaded()
    assert ll.pick("D", [a, b, c]) is b
    b.leases.update(Lease(b) for _ in range(5))
    assert ll.pick("D", [a, b, c]) is c


def test_least_loaded_breaks_ties_round_robin() -> None:
    a, b = _inst(8001), _inst(8002)
    ll = LeastLoaded()
    assert [ll.pick("D", [a, b]) for _ in range(4)] == [a, b, a, b]


def test_exclusion_is_the_callers_filter() -> None:
    a, b = _inst(8001), _inst(8002)
    rr = RoundRobin()
    tried = {a.address}
    assert rr.pick("D", [i for i in (a, b) if i.address not in tried]) is b


def test_make_picker() -> None:
    assert isinstance(make_picker("round-robin"), RoundRobin)
    assert isinstance(make_picker("least-loaded"), LeastLoaded)
    assert isinstance(make_picker("prefix"), PrefixAffinity)
    with pytest.raises(ValueError):
        make_picker("random")  # type: ignore[arg-type]


# --- prefix affinity ------------------------------------------------------------------------------

SYSTEM = "You are a helpful assistant. Answer briefly and cite your sources. " * 4  # 4+ chunks


def _chat(system: str, user: str) -> tuple[bytes, ...]:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return prompt_key(body, "/v1/chat/completions")


def test_prompt_key_is_per_model() -> None:
    """A LoRA adapter's KV is its own: the same prompt under another model has another key."""
    body = {"prompt": "x" * 200}
    base, lora = prompt_key({**body, "model": "base"}, "/v1/completions"), prompt_key({**body, "model": "sql"},
                                                                                      "/v1/completions")
    assert len(base) == len(lora) == 3 and not set(base) & set(lora)
    assert prompt_key({**body, "model": "sql"}, "/v1/completions") == lora


def test_prompt_key_is_per_cache_salt() -> None:
    """vLLM's cache_salt: an instance shares cached KV only within a salt, so each salt has its own
    key (the same one every time); an unsalted request keeps the key it had before salts existed."""
    body = {"prompt": "x" * 200, "model": "base"}
    plain = prompt_key(body, "/v1/completions")
    a, b = (prompt_key({**body, "cache_salt": s}, "/v1/completions") for s in ("a", "b"))
    assert len(a) == len(b) == len(plain) == 3 and not set(a) & set(b) and not set(a) & set(plain)
    assert prompt_key({**body, "cache_salt": "a"}, "/v1/completions") == a
    assert prompt_key({**body, "cache_salt": 7}, "/v1/completions") == plain  # not a salt (the instance refuses it)


def test_prompt_key_is_per_rendering() -> None:
    """A request's own chat template, its template kwargs and its tools change the rendered prompt's
    start: each has its own key; a chat request setting none of them keeps the plain key."""
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}]}
    plain = prompt_key(body, "/v1/chat/completions")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    keys = [prompt_key({**body, **extra}, "/v1/chat/completions") for extra in (
        {"chat_template": "{{ messages }}"}, {"chat_template_kwargs": {"enable_thinking": False}}, {"tools": [tool]})]
    assert all(len(k) == len(plain) for k in keys)
    assert len({k[0] for k in keys} | {plain[0]}) == 4  # pairwise different from the first chunk on
    assert prompt_key({**body, "tools": [tool]}, "/v1/chat/completions") == keys[2]
    assert prompt_key({**body, "tools": None}, "/v1/chat/completions") == plain
    text = {"prompt": "x" * 200}  # a completion is not rendered: the fields do not apply
    assert prompt_key({**text, "tools": [tool]}, "/v1/completions") == prompt_key(text, "/v1/completions")


def test_prompt_key_of_a_rendering_too_deep_to_write_is_the_plain_key() -> None:
    """Template kwargs or tools nested past the recursion limit (a body the proxy could decode, at a
    shallower stack) key as if unset, not a RecursionError (a 500 from the proxy)."""
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}]}
    deep: object = []
    for _ in range(5000):
        deep = [deep]
    plain = prompt_key(body, "/v1/chat/completions")
    assert prompt_key({**body, "chat_template_kwargs": {"a": deep}}, "/v1/chat/completions") == plain
    assert prompt_key({**body, "tools": deep}, "/v1/chat/completions") == plain


def test_prompt_key_chains_whole_chunks_of_the_prompt() -> None:
    a = prompt_key({"prompt": "x" * 200}, "/v1/completions")
    assert len(a) == 200 // CHUNK_BYTES and len(set(a)) == len(a)  # equal chunks, different chain hashes
    b = prompt_key({"prompt": "x" * 150 + "y" * 50}, "/v1/completions")
    assert b[:2] == a[:2] and b[2] != a[2]
    assert prompt_key({"prompt": ["x" * 200, "z"]}, "/v1/completions") == a  # a batch: its first prompt
    ids = prompt_key({"prompt": list(range(40))}, "/v1/completions")
    assert len(ids) == 40 * 4 // CHUNK_BYTES
    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                          {"role": "user", "content": "hi"}]}
    assert prompt_key(parts, "/v1/chat/completions") == _chat(SYSTEM, "hi")  # text parts = the string
    for bad in ({}, {"prompt": 5}, {"prompt": [1, "a"]}, {"messages": "no"}, {"prompt": [-1] * 64}):
        assert prompt_key(bad, "/v1/completions") == () and prompt_key(bad, "/v1/chat/completions") == ()


def test_prefix_affinity_sends_a_shared_prefix_where_it_went_before() -> None:
    a, b, c = _inst(8001), _inst(8002), _inst(8003)
    pa = PrefixAffinity()
    first = pa.pick("P", [a, b, c], _chat(SYSTEM, "one"))
    assert all(pa.pick("P", [a, b, c], _chat(SYSTEM, q)) is first for q in ("two", "three", "four"))
    other = pa.pick("P", [a, b, c], _chat("Another system prompt, quite different. " * 4, "one"))
    assert other is not first  # no match: the least loaded, round-robin among equals
    assert pa.matched(first, _chat(SYSTEM, "five")) >= len(SYSTEM) // CHUNK_BYTES


def test_prefix_affinity_yields_to_load_and_to_missing_keys() -> None:
    a, b = _inst(8001), _inst(8002)
    pa = PrefixAffinity(balance_slack=2)
    assert pa.pick("P", [a, b], _chat(SYSTEM, "q")) is a
    a.leases.update(Lease(a) for _ in range(2))
    assert pa.pick("P", [a, b], _chat(SYSTEM, "q")) is a  # 2 more in flight: still within the slack
    a.leases.add(Lease(a))
    assert pa.pick("P", [a, b], _chat(SYSTEM, "q")) is b  # 3 more: the least loaded takes it
    assert pa.pick("P", [a, b], _chat(SYSTEM, "q")) is b  # and now b has the prefix too
    assert pa.pick("P", [a, b]) is b  # no key: least loaded


def test_prefix_affinity_forgets_a_restarted_instance_and_old_chunks() -> None:
    a, b = _inst(8001), _inst(8002)
    a.engine_id = "one"
    pa = PrefixAffinity(max_chunks_per_instance=8)
    key = _chat(SYSTEM, "q")
    assert pa.pick("P", [a, b], key) is a and pa.matched(a, key) == len(key)
    a.engine_id = "two"  # same address, new process: an empty cache
    assert pa.matched(a, key) == 0
    pa.pick("P", [a], _chat("z" * 1000, "q"))  # 15 chunks into a model that keeps 8
    assert pa.matched(a, _chat("z" * 1000, "q")) == 8  # the tail chunks were evicted, the prefix kept
    assert pa.matched(a, key) == 0
