"""A prefill on "another host" (its own UTS namespace: another hostname, so the pair uses tcp and
no shared-memory liveness check applies) freezes while the decode waits for its KV.

A decode request that ends then (its client walked away) must give its blocks back at once: the
decode revokes the request's grant on its TCP data server, so no write of the frozen producer can
land in them later, and it need not hold them until the transfer deadline plus timeout (60 s here)
as it must for a peer that could write over shm. When the prefill wakes, its late pushes are
refused, and both instances serve again with every block back.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from pdserve.launch import RunningTopology, Topology, TopologySpec
from tests.faults.test_faults import blocks_back, restart, serve_ok

TRANSFER_TIMEOUT_S = 30.0  # long: quarantine would hold the blocks for 2x this
FREED_WITHIN_S = 10.0  # the blocks come back well before the transfer deadline
OTHER_HOST = "pdserve-test-other-host"


def _can_unshare_uts() -> bool:
    try:
        r = subprocess.run(["unshare", "--uts", "hostname", OTHER_HOST], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _can_unshare_uts(), reason="needs `unshare --uts` (root)")


@pytest.fixture
def topology(tmp_path) -> Iterator[RunningTopology]:
    spec = TopologySpec(
        kind="disagg", model="dummy:qwen3-tiny", kv_mode="write", cpu_map=((0,), (1,)),
        run_dir=str(tmp_path / "run"), stop_grace_s=5.0,
        engine_args=("--num-kv-blocks", "256", "--kv-transfer-timeout", str(TRANSFER_TIMEOUT_S)),
        # The proxy must not notice the frozen prefill (it would drop the pair and prefill locally):
        # the request ends because its client walks away.
        proxy_args=("--heartbeat-timeout", "120", "--health-interval", "60"),
    )
    with Topology(spec) as topo:
        yield topo


def _wait_health(url: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < end, f"{url} not healthy after {timeout_s:g} s"
        time.sleep(0.2)


def _free_blocks(url: str) -> tuple[float, float]:
    from tests.e2e.conftest import parse_metrics

    m = parse_metrics(httpx.get(f"{url}/metrics", timeout=5).text)
    return m["pdserve_kv_blocks_free"], m["pdserve_kv_blocks_total"]


def test_decode_frees_blocks_at_once_when_a_remote_prefill_freezes(topology):
    prefill = next(c for c in topology.instances if c.role == "prefill")
    decode = next(c for c in topology.instances if c.role == "decode")
    # The same prefill again, same ports, now under another hostname.
    prefill.kill_group()
    prefill.proc.wait(10)
    wrapped = ["unshare", "--uts", "sh", "-c", f'hostname {OTHER_HOST} && exec "$@"', "sh", *prefill.argv]
    old = prefill
    prefill = restart(topology, dataclasses.replace(old, argv=wrapped))
    topology.instances = tuple(prefill if c is old else c for c in topology.instances)  # stopped at the end
    _wait_health(prefill.url)
    serve_ok(topology.url)  # the pair has handshaked both ways (the producer knows our tcp port)
    blocks_back(decode, prefill)

    prefill.signal_leader(signal.SIGSTOP)
    try:
        body = {"prompt": list(range(1, 200)), "max_tokens": 8, "stream": True}
        with pytest.raises(httpx.TimeoutException):  # the prefill never answers; the client walks away
            with httpx.Client(timeout=3.0) as client, client.stream(
                "POST", f"{topology.url}/v1/completions", json=body
            ) as r:
                for _ in r.iter_lines():
                    pass
        t0 = time.monotonic()
        while True:
            free, total = _free_blocks(decode.url)
            if free == total:
                break
            assert time.monotonic() - t0 < FREED_WITHIN_S, (
                f"decode holds {total - free:g} blocks {FREED_WITHIN_S:g} s after its request ended "
                f"(quarantined until the transfer deadline?)\n{decode.log_tail()}"
            )
            time.sleep(0.2)
    finally:
        prefill.signal_leader(signal.SIGCONT)
    serve_ok(topology.url)
    blocks_back(decode, prefill)
