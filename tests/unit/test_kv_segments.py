"""KV segments in /dev/shm: a process killed together with its resource tracker (SIGKILL of the
whole group) leaves its segment behind; the next instance of the same pid namespace removes it,
and never one whose creator lives or that is not pdserve's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdserve.engine.kv_cache import SEGMENT_PREFIX, KVCache, KVLayout, segment_name, sweep_stale_segments

SHM = Path("/dev/shm")
CREATE = """
import sys, torch
from pdserve.engine.kv_cache import KVCache, KVLayout
cache = KVCache(KVLayout(1, 2, 4, 1, 8, torch.float32, None), torch.device("cpu"), shared=True)
print(cache.shm_name, flush=True)
sys.stdin.read()
"""

pytestmark = pytest.mark.skipif(not SHM.is_dir() or not Path("/proc/self/ns/pid").exists(),
                                reason="needs /dev/shm and /proc")


def test_a_killed_groups_segment_is_swept_by_the_next_instance() -> None:
    child = subprocess.Popen([sys.executable, "-c", CREATE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    try:
        name = child.stdout.readline().strip() if child.stdout else ""
        assert name.startswith(SEGMENT_PREFIX) and (SHM / name).exists()
        os.killpg(child.pid, signal.SIGKILL)  # the instance and its resource tracker
        child.wait()
        time.sleep(0.2)
        assert (SHM / name).exists()  # nobody left to unlink it
        mine = KVCache(KVLayout(1, 2, 4, 1, 8, torch.float32, None), torch.device("cpu"), shared=True)
        try:
            assert not (SHM / name).exists()  # the next instance swept it
            assert (SHM / mine.shm_name).exists()  # and its own lives
            assert mine.shm_name not in sweep_stale_segments()  # a live creator's segment stays
        finally:
            mine.close()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)


def test_other_segments_are_left_alone(tmp_path: Path) -> None:
    """Only pdserve's names of this pid namespace with a dead pid go."""
    ns = segment_name().removeprefix(SEGMENT_PREFIX).split("_")[0]
    dead = 2**22 + 12345  # above pid_max's default: no such process
    names = {
        f"{SEGMENT_PREFIX}{ns}_{dead}_ab": False,  # ours, dead: swept
        f"{SEGMENT_PREFIX}{int(ns) + 1}_{dead}_ab": True,  # another namespace: kept
        f"{SEGMENT_PREFIX}{ns}_{os.getpid()}_ab": True,  # alive: kept
        f"psm_{dead}": True,  # not pdserve's
        f"{SEGMENT_PREFIX}junk": True,
    }
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert sweep_stale_segments(str(tmp_path)) == [f"{SEGMENT_PREFIX}{ns}_{dead}_ab"]
    assert {n: (tmp_path / n).exists() for n in names} == names
