"""`pdserve up` / `launch_topology` on real processes: every topology starts, serves one request
through its proxy, and stops cleanly: exit code 0, no process of any child's group left, and the
instances' shared-memory KV segments gone."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from pdserve.launch import RunningTopology, group_members, launch_topology, parse_topology
from tests.e2e.conftest import REPO_ROOT, TINY_MODEL

ENGINE_ARGS = ("--num-kv-blocks", "128", "--max-model-len", "512")


def shm_segments(pid: int) -> set[str]:
    """The /dev/shm files process `pid` has mapped."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/maps") as f:
            return {line.split()[-1] for line in f if "/dev/shm/" in line}
    return set()


def snapshot(topo: RunningTopology) -> tuple[set[int], set[str]]:
    """Every pid of every child's process group, and every shm segment the instances mapped."""
    pids = {p for c in topo.children for p in group_members(c.pid)}
    return pids, {s for c in topo.instances for s in shm_segments(c.pid)}


def assert_gone(pids: set[int], segments: set[str]) -> None:
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {alive}"
    assert not [s for s in segments if os.path.exists(s)], f"shm segments left behind: {segments}"


def one_request(url: str) -> None:
    body = {"model": TINY_MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60, trust_env=False) as r:
        assert r.status_code == 200, r.read()
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"completion_tokens":8' in events[-2].replace(" ", "")


@pytest.mark.parametrize("name", ["standard:2", "disagg-read"])  # standard:1 and disagg-write: below, via the CLI
def test_topology_serves_and_stops_cleanly(name: str, tmp_path: Path) -> None:
    spec = parse_topology(name, TINY_MODEL, run_dir=str(tmp_path), engine_args=ENGINE_ARGS, startup_timeout_s=120)
    topo = launch_topology(spec)
    try:
        pids, segments = snapshot(topo)
        assert {c.name for c in topo.instances} == (
            {"standalone-0", "standalone-1"} if name.startswith("standard") else {"prefill-0", "decode-0"})
        for c in topo.instances:  # pinned as planned
            assert os.sched_getaffinity(c.pid) == set(c.cpus)
        if spec.kind == "disagg":
            assert all(shm_segments(c.pid) for c in topo.instances), "disagg instances keep KV in shm"
        rows = httpx.get(f"{topo.url}/instances", timeout=5, trust_env=False).json()
        assert sorted(r["role"] for r in rows) == sorted(spec.roles) and all(r["healthy"] for r in rows)
        one_request(topo.url)
    finally:
        codes = topo.stop()
    assert codes == {c.name: 0 for c in topo.children}
    assert_gone(pids, segments)
    assert topo.stop() == codes  # idempotent
    assert {p.name for p in tmp_path.iterdir()} >= {"proxy.log", *(f"{c.name}.log" for c in topo.instances)}


@contextlib.contextmanager
def up_process(tmp: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str, set[int]]]:
    """`pdserve up ... --port 0` in its own session; yields it, the proxy URL and its children's pids."""
    argv = [sys.executable, "-m", "pdserve.cli", "up", *args, "--port", "0", "--run-dir", str(tmp),
            "--engine-args", " ".join(ENGINE_ARGS)]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=open(tmp / "up.err", "w"),
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        m = re.search(r"ready: (http://\S+)", line)
        assert m, f"no ready line: {line!r}\n{(tmp / 'up.err').read_text()}"
        time.sleep(0.2)  # the pid lines follow the ready line on stderr
        pids = {int(p) for p in re.findall(r" pid (\d+)", (tmp / "up.err").read_text())}
        yield proc, m.group(1), {q for p in pids for q in group_members(p)} | pids
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_command_stops_everything_on_a_signal(sig: signal.Signals, tmp_path: Path) -> None:
    args = ("standard", TINY_MODEL) if sig == signal.SIGINT else ("disagg", TINY_MODEL, "--kv-mode", "write")
    with up_process(tmp_path, *args) as (proc, url, pids):
        assert len(pids) >= (2 if sig == signal.SIGINT else 3)
        segments = {s for p in pids for s in shm_segments(p)}
        one_request(url)
        proc.send_signal(sig)  # what Ctrl-C in the terminal or a service manager sends
        assert proc.wait(60) == 0
    err = (tmp_path / "up.err").read_text()
    assert "stopped: proxy 0" in err, err
    assert_gone(pids, segments)
