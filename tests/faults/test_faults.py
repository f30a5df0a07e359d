"""Fault injection under steady load, real processes: `pdserve up`'s topologies on dummy:qwen3-tiny.

Each test runs streaming clients through the proxy, injects one fault, and checks:
  * every request ends with its tokens or a clear error, within BOUND_S (no hang, none lost);
  * once a healthy path exists again, requests succeed;
  * every surviving instance's free KV blocks return to their totals;
  * a restarted instance (or proxy) re-registers and serves.
CI runs the reduced size (`make test`); `make faults` runs `--faults-full` (more clients, longer).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from pdserve.launch import ChildProcess, RunningTopology, Topology, TopologySpec, start_child
from tests.e2e.conftest import parse_metrics

HEARTBEAT_S = 1.0
TRANSFER_TIMEOUT_S = 2.0
# A request may wait: its KV transfer timeout, the proxy noticing a dead instance (heartbeat), a
# retry on another path, and its own generation. Anything longer is a hang.
BOUND_S = 20.0


@dataclass
class Outcome:
    start: float
    end: float
    tokens: int
    error: str | None  # None: completed with its tokens
    prompt: list[int] = field(default_factory=list)
    max_tokens: int = 0
    text: str = ""  # what the stream delivered (to compare with a later answer)

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Load:
    """`clients` threads streaming completions through the proxy until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(BOUND_S + 30)
        assert not any(t.is_alive() for t in self._threads), "a client is still waiting: a request hangs"

    def _run(self, seed: int) -> None:
        n = 0
        with httpx.Client(timeout=BOUND_S + 20) as client:
            while not self._stop.is_set():
                n += 1
                prompt = [(seed * 31 + n * 7 + j) % 250 for j in range(10 + (n * 13 + seed) % 90)]
                outcome = self._one(client, prompt, 8 + (n + seed) % 24)
                self._record(outcome)
                if outcome.error is not None:
                    self._stop.wait(0.2)  # a real client backs off; a hot retry loop would starve the machine

    def _one(self, client: httpx.Client, prompt: list[int], max_tokens: int) -> Outcome:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        t0 = time.monotonic()
        tokens, error, text = 0, None, []
        try:
            with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    error = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    done = False
                    for line in r.iter_lines():
                        if line.startswith("data: [DONE]"):
                            done = True
                        elif '"error"' in line:
                            error = line[:200]
                        elif line.startswith("data: ") and '"text"' in line:
                            tokens += 1
                            text.append(json.loads(line[6:])["choices"][0]["text"])
                    if error is None and not done:
                        error = "stream ended without [DONE]"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        return Outcome(t0, time.monotonic(), tokens, error, prompt, max_tokens, "".join(text))

    def _record(self, o: Outcome) -> None:
        with self._lock:
            self.outcomes.append(o)


def assert_bounded(outcomes: list[Outcome]) -> None:
    assert outcomes, "no request ran"
    errors = sum(o.error is not None for o in outcomes)
    print(f"\n[faults] {len(outcomes)} requests, {errors} ended with a clear error, "
          f"longest {max(o.seconds for o in outcomes):.2f} s (bound {BOUND_S:g} s)")
    slow = [o for o in outcomes if o.seconds > BOUND_S]
    assert not slow, f"{len(slow)} requests took longer than {BOUND_S} s: {slow[:3]}"
    lost = [o for o in outcomes if o.error is None and o.tokens == 0]
    assert not lost, f"{len(lost)} requests ended with neither tokens nor an error"


def serve_ok(url: str, n: int = 3, deadline_s: float = 30.0) -> None:
    """`n` requests in a row succeed (waiting until a healthy path exists, within the deadline)."""
    end = time.monotonic() + deadline_s
    ok = 0
    last = ""
    with httpx.Client(timeout=30) as client:
        while ok < n:
            try:
                r = client.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0})
                ok = ok + 1 if r.status_code == 200 and r.json()["choices"][0]["text"] is not None else 0
                last = r.text[:200]
            except httpx.HTTPError as e:
                ok, last = 0, str(e)
            if ok < n:
                assert time.monotonic() < end, f"no healthy path after {deadline_s} s: {last}"
                time.sleep(0.3)


def blocks_back(*instances: ChildProcess, timeout: float = 30.0) -> None:
    for inst in instances:
        end = time.monotonic() + timeout
        while True:
            m = parse_metrics(httpx.get(f"{inst.url}/metrics", timeout=5).text)
            if m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"] and m["pdserve_num_requests_running"] == 0:
                break
            assert time.monotonic() < end, f"{inst.name}: {m['pdserve_kv_blocks_free']} of " \
                                           f"{m['pdserve_kv_blocks_total']} blocks free after {timeout} s"
            time.sleep(0.2)


def restart(topo: RunningTopology, child: ChildProcess) -> ChildProcess:
    """Start `child`'s command line again (same ports), replace it in the topology, wait until
    the proxy lists it healthy (it re-registered)."""
    new = start_child(child.name, child.role, child.argv, child.log_path, child.host, child.port, cpus=child.cpus)
    if child is topo.proxy:
        topo.proxy = new
    else:
        topo.instances = tuple(new if c is child else c for c in topo.instances)
    end = time.monotonic() + 60
    while True:
        try:
            rows = httpx.get(f"{topo.url}/instances", timeout=2).json()
            healthy = {r["address"] for r in rows if r["healthy"]}
            if all(f"{c.host}:{c.port}" in healthy for c in topo.instances):
                return new
        except httpx.HTTPError:
            pass
        assert time.monotonic() < end, f"{child.name} did not (re-)register: {new.log_tail()}"
        time.sleep(0.2)


@pytest.fixture(params=["write", "read"])
def topology(request, tmp_path) -> Iterator[RunningTopology]:
    spec = TopologySpec(
        kind="disagg", model="dummy:qwen3-tiny", kv_mode=request.param, cpu_map=((0,), (1,)),
        run_dir=str(tmp_path / "run"), stop_grace_s=5.0,
        engine_args=("--num-kv-blocks", "256", "--kv-transfer-timeout", str(TRANSFER_TIMEOUT_S),
                     "--kv-lease-seconds", "5"),
        proxy_args=("--heartbeat-timeout", str(HEARTBEAT_S)),
    )
    with Topology(spec) as topo:
        yield topo


def _role(topo: RunningTopology, role: str) -> ChildProcess:
    return next(c for c in topo.instances if c.role == role)


def _under_load(topo: RunningTopology, clients: int, fault, settle_s: float) -> list[Outcome]:
    with Load(topo.url, clients) as load:
        time.sleep(settle_s)
        fault()
        time.sleep(settle_s)
    return load.outcomes


@pytest.mark.parametrize("victim", ["prefill", "decode"])
def test_kill_9_under_load(topology, victim, fault_size):
    clients, settle = fault_size
    target = _role(topology, victim)
    outcomes = _under_load(topology, clients, lambda: target.kill_group(), settle)
    assert_bounded(outcomes)
    survivor = _role(topology, "decode" if victim == "prefill" else "prefill")
    blocks_back(survivor)
    new = restart(topology, target)
    serve_ok(topology.url)
    blocks_back(survivor, new)


def test_sigstop_decode_longer_than_transfer_timeout(topology, fault_size):
    clients, settle = fault_size
    decode = _role(topology, "decode")

    def freeze() -> None:
        decode.signal_leader(signal.SIGSTOP)
        time.sleep(TRANSFER_TIMEOUT_S * 2 + HEARTBEAT_S)
        decode.signal_leader(signal.SIGCONT)

    outcomes = _under_load(topology, clients, freeze, settle)
    assert_bounded(outcomes)
    serve_ok(topology.url)
    blocks_back(*topology.instances)


def test_proxy_restarted(topology, fault_size):
    clients, settle = fault_size
    proxy = topology.proxy

    def bounce() -> None:
        proxy.kill_group()
        proxy.proc.wait()
        restart(topology, proxy)

    outcomes = _under_load(topology, clients, bounce, settle)
    assert_bounded(outcomes)
    serve_ok(topology.url)
    blocks_back(*topology.instances)
