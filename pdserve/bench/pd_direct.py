"""Drive one prefill and one decode instance directly, playing the proxy's part, one request at a
time: the decode half is streamed and timed, TTFT from the first POST (prefill's, or both at once
in write mode) to the first decode chunk, ITL between chunks. For checks and short benches
(benchmarks/gpu_check.py, tests/gpu) that need no proxy process; `pdserve bench` is the load test.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from dataclasses import dataclass

import httpx

from pdserve.bench.sse import SSEDecoder, StreamError, TokenChunk, interpret


@dataclass(frozen=True)
class Timed:
    """One streamed completion: its text, finish reason, TTFT and inter-chunk gaps (seconds)."""

    text: str
    finish_reason: str | None
    ttft_s: float
    itl_s: tuple[float, ...]


def _post(base: str, body: dict, rid: str, timeout: float) -> dict:
    r = httpx.post(f"{base}/v1/completions", json=body, headers={"X-Request-Id": rid}, timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"{base}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def _stream(base: str, body: dict, rid: str, t0: float, timeout: float) -> Timed:
    times: list[float] = []
    text: list[str] = []
    finish = None
    decoder = SSEDecoder()
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True},
                      headers={"X-Request-Id": rid}, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for data in r.iter_bytes():
            now = time.perf_counter()
            for item in (i for ev in decoder.feed(data) for i in interpret(ev)):
                if isinstance(item, StreamError):
                    raise RuntimeError(f"{base}: stream error: {item.message}")
                if isinstance(item, TokenChunk):
                    times.append(now)
                    text.append(item.text)
                    finish = item.finish_reason or finish
    if not times:
        raise RuntimeError(f"{base}: no token chunk received")
    itl = tuple(b - a for a, b in zip(times[:-1], times[1:], strict=True))
    return Timed("".join(text), finish, times[0] - t0, itl)


def standalone(base: str, body: dict, timeout: float = 120.0) -> Timed:
    """One streamed request to a standalone instance."""
    return _stream(base, body, uuid.uuid4().hex, time.perf_counter(), timeout)


def disagg(prefill: str, decode: str, body: dict, mode: str, timeout: float = 120.0) -> Timed:
    """One request through `prefill` then `decode` (base URLs) in "read" or "write" KV mode."""
    rid = uuid.uuid4().hex
    if mode == "read":
        t0 = time.perf_counter()
        pr = _post(prefill, {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}, rid, timeout)
        return _stream(decode, {**body, "kv_transfer_params": pr["kv_transfer_params"]}, rid, t0, timeout)
    pinfo = httpx.get(f"{prefill}/kv_info", timeout=10).json()
    dinfo = httpx.get(f"{decode}/kv_info", timeout=10).json()

    def peer(info: dict) -> dict:
        return {"transfer_mode": "WRITE", "remote_engine_id": info["engine_id"], "remote_host": info["host"],
                "remote_handshake_port": info["handshake_port"], "remote_notify_port": info["notify_port"]}

    to_p = {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True, **peer(dinfo)}}
    to_d = {**body, "kv_transfer_params": {"do_remote_prefill": True, **peer(pinfo)}}
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fp = pool.submit(_post, prefill, to_p, rid, timeout)
        fd = pool.submit(_stream, decode, to_d, rid, t0, timeout)
        fp.result()
        return fd.result()
