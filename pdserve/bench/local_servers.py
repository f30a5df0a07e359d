"""Start several `pdserve serve` processes on this host at once, wait until all are healthy, stop
them all (process groups) at the end. For checks that need real instances but no launcher or
proxy: tests/gpu and benchmarks/gpu_check.py's disagg stage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `pdserve serve ARGV` process on a free port, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = logdir / f"{name}-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pdserve.cli", "serve", *argv, "--port", str(self.port), "--no-access-log"],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not healthy after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it if still there after 15 s."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@contextlib.contextmanager
def servers(specs: dict[str, list[str]], logdir: Path, timeout: float = 120.0) -> Iterator[dict[str, Server]]:
    """Start every `name: serve argv` at once; yield them once all are healthy; stop all at exit."""
    started: dict[str, Server] = {}
    try:
        for name, argv in specs.items():
            started[name] = Server(name, argv, logdir)
        for s in started.values():
            s.wait_healthy(timeout)
        yield started
    finally:
        for s in started.values():
            s.stop()
