"""Process lifecycle of the launcher on stand-in children (no model; fast): SIGKILL after the grace
period, the killed child's resource tracker still unlinks its shared memory, no orphan when the
launcher itself dies, and a start failure names the failing instance and its log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pdserve.launch import TopologyError, group_members, launch_topology, parse_topology, start_child, stop_children

STUBBORN = """
import signal, time
from multiprocessing import shared_memory
signal.signal(signal.SIGTERM, signal.SIG_IGN)
shm = shared_memory.SharedMemory(create=True, size=4096)
print(shm.name, flush=True)
time.sleep(120)
"""


def wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_ignored_means_sigkill_and_the_tracker_still_unlinks_shm(tmp_path: Path) -> None:
    log = tmp_path / "stub.log"
    child = start_child("stub", "standalone", [sys.executable, "-c", STUBBORN], log, "127.0.0.1", 0)
    name = re.compile(r"^/?(psm_\w+)$", re.MULTILINE)
    assert wait_for(lambda: name.search(log.read_text()) is not None), log.read_text()
    segment = "/dev/shm/" + name.search(log.read_text()).group(1)  # type: ignore[union-attr]
    assert os.path.exists(segment) and len(group_members(child.pid)) == 2  # the stub and its tracker
    t0 = time.monotonic()
    assert stop_children([child], grace_s=0.5) == {"stub": -9}
    assert time.monotonic() - t0 < 6
    assert group_members(child.pid) == []
    assert not os.path.exists(segment)


PARENT = """
import sys, time
from pathlib import Path
from pdserve.launch import start_child
c = start_child("sleeper", "standalone", [sys.executable, "-c", "import time; time.sleep(120)"],
                Path(sys.argv[1]), "127.0.0.1", 0)
print(c.pid, flush=True)
time.sleep(120)
"""


def test_children_die_with_a_killed_launcher(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "s.log")], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        child = int(parent.stdout.readline()) if parent.stdout else 0
        assert psutil.pid_exists(child)
        parent.kill()
        parent.wait()
        assert wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_start_failure_names_the_instance_and_its_log(tmp_path: Path) -> None:
    spec = parse_topology("standard:1", "dummy:no-such-preset", run_dir=str(tmp_path), startup_timeout_s=60)
    with pytest.raises(TopologyError) as exc:
        launch_topology(spec)
    msg = str(exc.value)
    assert "standalone-0" in msg and str(tmp_path / "standalone-0.log") in msg and "no-such-preset" in msg
    assert not [p for p in psutil.process_iter(["cmdline"]) if "dummy:no-such-preset" in " ".join(
        p.info["cmdline"] or []) and str(tmp_path) in " ".join(p.info["cmdline"] or [])]
