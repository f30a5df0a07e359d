"""Real processes on loopback: start a pdserve command on a free port, wait until it is healthy,
and always stop it (and its process group) at teardown. Reusable by server, proxy and disagg
tests: `launch([...])` is a context manager; `pdserve_server(...)` builds a `serve` command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = "dummy:qwen3-tiny"
STARTUP_TIMEOUT_S = 90.0
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


@dataclass
class ServerProcess:
    """A started process serving HTTP on 127.0.0.1:port; its stdout+stderr go to `log_path`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1_url(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        r = httpx.get(f"{self.base_url}/metrics", timeout=10)
        r.raise_for_status()
        return parse_metrics(r.text)

    def wait_metrics(self, expected: dict[str, float], timeout: float = 15.0) -> dict[str, float]:
        """Poll /metrics until every `expected` sample has its value; fail with the last values."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.metrics()
            if all(got.get(k) == v for k, v in expected.items()):
                return got
            if time.monotonic() > deadline:
                seen = {k: got.get(k) for k in expected}
                raise AssertionError(f"{self.log_path.name}: metrics did not reach {expected} within {timeout} s; "
                                     f"last {seen}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal, wait, then kill the whole process group if it is still there. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children too; the leader may have exited
        return self.proc.wait(10)


def wait_healthy(server: ServerProcess, path: str = "/health", timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode} during startup:\n{server.log()}")
        try:
            if httpx.get(server.base_url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{server.base_url}{path} not healthy after {timeout} s:\n{server.log()}")


@contextlib.contextmanager
def launch(
    argv: Sequence[str], port: int, log_path: Path, health_path: str = "/health", env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Run `argv` (its own process group), wait for `health_path` to answer 200, stop it on exit."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    server = ServerProcess(proc, port, log_path)
    try:
        wait_healthy(server, health_path)
        yield server
    finally:
        server.stop()


def pdserve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdserve.cli", *args]


@contextlib.contextmanager
def pdserve_server(tmp_dir: Path, *extra: str, model: str = TINY_MODEL) -> Iterator[ServerProcess]:
    """`pdserve serve` on a free port with small test defaults (one torch thread, a small cache)."""
    port = free_port()
    argv = pdserve_argv(
        "serve", model, "--port", str(port), "--threads", "1", "--num-kv-blocks", "256", "--no-access-log", *extra
    )
    with launch(argv, port, tmp_dir / f"serve-{port}.log") as server:
        yield server


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


def send_fuzzed(client: httpx.Client, method: str, path: str, body: object, headers: dict[str, str]) -> httpx.Response:
    """Send one generated case as raw JSON (negative mode makes bodies JSON cannot express: sent as
    their repr) and check what every fuzz test asks of it: no 5xx, and a 4xx in OpenAI's error shape."""
    try:
        content = json.dumps(body).encode()
    except (TypeError, ValueError):
        content = repr(body).encode()
    headers = {"Content-Type": "application/json", **headers}
    r = client.request(method, path, content=content if method == "POST" else None, headers=headers)
    assert r.status_code < 500, f"{r.status_code} for {body!r}: {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and "type" in err
    return r
