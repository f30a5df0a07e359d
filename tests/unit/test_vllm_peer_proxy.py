"""The 1P+1D proxy bodies and ratios of benchmarks/vllm_peer_serving.py (pure logic, no vLLM)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_peer_serving.py"
_spec = importlib.util.spec_from_file_location("vllm_peer_serving", _PATH)
assert _spec is not None and _spec.loader is not None
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

BODY = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 100, "min_tokens": 100, "ignore_eos": True,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


def test_prefill_body_asks_one_token_kept_for_remote_decode():
    out = peer.prefill_body(BODY)
    assert out["max_tokens"] == 1 and out["stream"] is False
    assert "min_tokens" not in out and "stream_options" not in out  # vLLM: min_tokens <= max_tokens
    assert "max_completion_tokens" not in out
    assert out["kv_transfer_params"]["do_remote_decode"] is True
    assert out["kv_transfer_params"]["do_remote_prefill"] is False
    assert out["prompt"] == [1, 2, 3] and out["ignore_eos"] is True
    assert BODY["max_tokens"] == 100 and "kv_transfer_params" not in BODY  # the client's body untouched


def test_prefill_body_chat_limit():
    out = peer.prefill_body({"messages": [], "max_completion_tokens": 50, "stream": True})
    assert out["max_completion_tokens"] == 1 and out["max_tokens"] == 1


def test_decode_body_forwards_prefill_params():
    params = {"do_remote_prefill": True, "remote_block_ids": [[1]], "remote_engine_id": "e"}
    out = peer.decode_body(BODY, {"choices": [], "kv_transfer_params": params})
    assert out["kv_transfer_params"] == params
    assert {k: v for k, v in out.items() if k != "kv_transfer_params"} == BODY
    assert "kv_transfer_params" not in peer.decode_body({**BODY, "kv_transfer_params": {"x": 1}}, {"choices": []})


def test_ratios():
    assert peer.ratio(2.0, 4.0) == 0.5
    assert peer.ratio(1.0, 0.0) is None and peer.ratio(None, 1.0) is None and peer.ratio(float("nan"), 1.0) is None
    keys = [k for k, *_ in peer.METRICS]
    a = {1.0: dict.fromkeys(keys, 2.0), 2.0: dict.fromkeys(keys, 1.0)}
    b = {1.0: dict.fromkeys(keys, 4.0)}
    rows = peer.pair_rows(a, b)
    assert [r["rate"] for r in rows] == [1.0]
    assert rows[0]["ratio"] == pytest.approx(dict.fromkeys(keys, 0.5))
    md = peer.pair_markdown("standard:2", "vllm-standard:2", rows, {})
    assert "| 1 req/s |" in md and "(0.50×)" in md
