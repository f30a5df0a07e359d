"""Fault injection: the prefill-decode link cut while KV transfers are in flight (real processes).

The test makes two network namespaces, A (prefill) and B (decode), and three veth pairs with
private /30 addresses:

    root <-> A, root <-> B   HTTP (the proxy and the clients stay in the root namespace), registration
    A <-> B                  the KV link: each instance's --kv-host, with --kv-transport tcp, so the
                             handshake, the notify messages and the KV bytes all cross it

A's end of the KV link is shaped (tbf, KV_RATE) so that a request's KV takes tens to hundreds of
milliseconds to cross, as between hosts, and a transfer is in flight most of the time. Under steady
streaming load the test waits until KV bytes are on their way, sets one end of the A <-> B pair
down for longer than the transfer timeout, then up again. The end set down is the far one from
the instance that waits for the transfer (write: the prefill pushes, so B's end; read: the decode
pulls, so A's end): that instance sees its packets vanish, not a quick "network unreachable".

Checks, as in test_faults.py: every request ends with its tokens or a clear error within BOUND_S
(and within CUT_BOUND_S: on its transfer timeout, not when the link is back);
the cut hit transfers; a transfer given up leaves no bytes in the kernel that the link, once back,
would still deliver (a late write would land in decode blocks that have since been freed and
given to another request); KV transfers resume within RECOVER_S of the link coming back and
requests then succeed over the KV path (not the proxy's local-prefill fallback); requests served
around the cut give the text the decode computes alone (their KV was their prompt's); both instances'
free KV blocks return to their totals. Skipped where network namespaces cannot be made (not
root, no `ip`, no netns/veth support); without tbf the cut comes at a random moment of the load.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdserve.launch import (
    ChildProcess,
    RunningTopology,
    TopologySpec,
    free_port,
    instance_argv,
    plan_instances,
    proxy_argv,
    start_child,
    wait_ready,
)
from tests.e2e.conftest import parse_metrics
from tests.faults.test_faults import TRANSFER_TIMEOUT_S, Load, Outcome, assert_bounded, blocks_back

DOWN_S = TRANSFER_TIMEOUT_S * 3  # longer than the transfer timeout, with room to spare
# Within test_faults.py's BOUND_S, a request waits its transfer timeout (then fails or falls back),
# never for the link to come back: so the longest may not reach DOWN_S.
CUT_BOUND_S = TRANSFER_TIMEOUT_S * 2 + 1.0
# Heartbeats cross the root links, which stay up: the proxy's default timeout, not test_faults.py's 1 s
# (one heartbeat a second; on a loaded 2-core machine a 1 s timeout evicts a healthy instance now and then).
HEARTBEAT_S = 3.0
RECOVER_S = 15.0  # link up -> a KV transfer completes again
KV_RATE = "2mbit"  # A's egress on the KV link: 8-56 KB of KV per request take 30-250 ms
INSTANCE_PORT = 18080  # each instance is alone in its namespace
_STALE = re.compile(r"^pdlc(\d+)-[ab]$")


def _ip(command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip COMMAND` (words split on spaces)."""
    return subprocess.run(["ip", *command.split()], capture_output=True, text=True, check=check, timeout=15)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """Namespaces (and their root-side veths) left by an earlier run of this test that was killed."""
    for line in _ip("netns list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip(f"link del pdlc{m.group(1)}r{name[-1]}", check=False)
            _ip(f"netns del {name}", check=False)


def _free_net() -> str:
    """A 10.X prefix that no address or route of the root namespace uses."""
    used = "\n" + _ip("-4 addr").stdout + _ip("-4 route show table all").stdout
    for i in range(50):
        prefix = f"10.{200 + (os.getpid() + i) % 50}"
        if f" {prefix}." not in used and f"\n{prefix}." not in used:
            return prefix
    pytest.skip("no free prefix in 10.200-249.0.0/16 for the test's links")


@dataclasses.dataclass
class Lab:
    """Namespaces A and B and three veth pairs; `close()` removes them (idempotent)."""

    tag: str
    net: str
    shaped: bool = False  # A's end of the KV link is rate-limited

    @property
    def ns_a(self) -> str:
        return f"{self.tag}-a"

    @property
    def ns_b(self) -> str:
        return f"{self.tag}-b"

    def addr(self, link: int, host: int) -> str:
        return f"{self.net}.{link}.{host}"

    # root <-> A: .1.1 / .1.2; root <-> B: .2.1 / .2.2; A <-> B (KV): .3.1 (A) / .3.2 (B)
    root_a = property(lambda self: self.addr(1, 1))
    a = property(lambda self: self.addr(1, 2))
    root_b = property(lambda self: self.addr(2, 1))
    b = property(lambda self: self.addr(2, 2))
    kv_a = property(lambda self: self.addr(3, 1))
    kv_b = property(lambda self: self.addr(3, 2))

    def kv_end(self, side: str) -> tuple[str, str]:
        """(namespace, device) of the KV link's end in A or B."""
        return (self.ns_a, f"{self.tag}ab") if side == "a" else (self.ns_b, f"{self.tag}ba")

    @classmethod
    def make(cls) -> Lab:
        if os.geteuid() != 0:
            pytest.skip("needs root to make network namespaces")
        if shutil.which("ip") is None or shutil.which("ss") is None:
            pytest.skip("needs iproute2 (`ip`, `ss`) to make and watch network namespaces")
        _remove_stale()
        lab = cls(f"pdlc{os.getpid()}", _free_net())
        try:
            lab._build()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            lab.close()
            err = getattr(e, "stderr", "") or ""
            pytest.skip(f"cannot make network namespaces and veth pairs: {' '.join(e.cmd)}: {err.strip()}")
        return lab

    def _build(self) -> None:
        t = self.tag
        for ns in (self.ns_a, self.ns_b):
            _ip(f"netns add {ns}")
            _ip(f"-n {ns} link set lo up")
        for side, ns, root_ip, ns_ip in (("a", self.ns_a, self.root_a, self.a), ("b", self.ns_b, self.root_b, self.b)):
            _ip(f"link add name {t}r{side} type veth peer name {t}{side}r netns {ns}")
            _ip(f"addr add {root_ip}/30 dev {t}r{side}")
            _ip(f"link set {t}r{side} up")
            _ip(f"-n {ns} addr add {ns_ip}/30 dev {t}{side}r")
            _ip(f"-n {ns} link set {t}{side}r up")
        _ip(f"link add name {t}ab netns {self.ns_a} type veth peer name {t}ba netns {self.ns_b}")
        for ns, dev, kv_ip in ((self.ns_a, f"{t}ab", self.kv_a), (self.ns_b, f"{t}ba", self.kv_b)):
            _ip(f"-n {ns} addr add {kv_ip}/30 dev {dev}")
            _ip(f"-n {ns} link set {dev} up")
        # B reaches the proxy's registry (bound on root's A-facing address) through root. No default
        # route anywhere, so a downed KV link has no detour.
        _ip(f"-n {self.ns_b} route add {self.root_a}/32 via {self.root_b}")
        if shutil.which("tc"):
            tbf = f"netns exec {self.ns_a} tc qdisc add dev {t}ab root tbf rate {KV_RATE} burst 4kb latency 1s"
            self.shaped = _ip(tbf, check=False).returncode == 0

    def set_kv_link(self, side: str, state: str) -> None:
        ns, dev = self.kv_end(side)
        _ip(f"-n {ns} link set {dev} {state}")

    def close(self) -> None:
        t = self.tag
        for command in (
            f"link del {t}ra",
            f"link del {t}rb",
            f"-n {self.ns_a} link del {t}ab",
            f"netns del {self.ns_a}",
            f"netns del {self.ns_b}",
        ):
            _ip(command, check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab.make()
    try:
        yield lab
    finally:
        lab.close()


def start_across(lab: Lab, kv_mode: str, run_dir: Path, blocks: int) -> RunningTopology:
    """The proxy in the root namespace (HTTP and registry on root's A-facing address), the prefill
    in A and the decode in B, each with HTTP on its root-facing address and KV on the A <-> B link."""
    spec = TopologySpec(
        kind="disagg",
        model="dummy:qwen3-tiny",
        kv_mode=kv_mode,  # type: ignore[arg-type]
        cpu_map=((0,), (1,)),
        host=lab.root_a,
        run_dir=str(run_dir),
        stop_grace_s=5.0,
        engine_args=(
            *f"--num-kv-blocks {blocks} --kv-transfer-timeout {TRANSFER_TIMEOUT_S}".split(),
            *"--kv-lease-seconds 5 --kv-transport tcp".split(),
        ),
        proxy_args=("--heartbeat-timeout", str(HEARTBEAT_S)),
    )
    port, registry_port = free_port(lab.root_a), free_port(lab.root_a)
    proxy = start_child(
        "proxy", "proxy", proxy_argv(spec, port, registry_port), run_dir / "proxy.log", lab.root_a, port
    )
    topo = RunningTopology(spec, run_dir, proxy, ())
    try:
        for plan in plan_instances(spec):
            ns, http_host, kv_host = (
                (lab.ns_a, lab.a, lab.kv_a) if plan.role == "prefill" else (lab.ns_b, lab.b, lab.kv_b)
            )
            argv = instance_argv(
                dataclasses.replace(spec, host=http_host), plan, INSTANCE_PORT, f"{lab.root_a}:{registry_port}"
            )
            argv = ["ip", "netns", "exec", ns, *argv, "--kv-host", kv_host]
            child = start_child(
                plan.name, plan.role, argv, run_dir / f"{plan.name}.log", http_host, INSTANCE_PORT, cpus=plan.cpus
            )
            topo.instances = (*topo.instances, child)
        wait_ready(topo, 120)
    except BaseException:
        topo.stop()
        raise
    return topo


@pytest.fixture(params=["write", "read"])
def across(request, lab, tmp_path, fault_size) -> Iterator[tuple[Lab, RunningTopology]]:
    # A small pool (16 blocks a client; a request needs 1-9): freed blocks are soon handed out again,
    # so a late write into them would corrupt a request that is being served.
    topo = start_across(lab, request.param, tmp_path / "run", 16 * fault_size[0])
    try:
        yield lab, topo
    finally:
        topo.stop()


def texts_that_differ(url: str, outcomes: list[Outcome]) -> list[Outcome]:
    """Requests whose (greedy) text differs when `url` (an instance: no transfer) computes them
    again: the KV they were served with was not their prompt's."""

    def differs(o: Outcome) -> bool:
        body = {"prompt": o.prompt, "max_tokens": o.max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        r.raise_for_status()
        return r.json()["choices"][0]["text"] != o.text

    with ThreadPoolExecutor(4) as pool:
        return [o for o, bad in zip(outcomes, pool.map(differs, outcomes), strict=True) if bad]


def _metrics(inst: ChildProcess) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{inst.url}/metrics", timeout=5).text)


def _counter(topo: RunningTopology, name: str) -> float:
    """`name` summed over both instances."""
    return sum(_metrics(c).get(name, 0.0) for c in topo.instances)


def kv_path_ok(topo: RunningTopology, n: int = 3, deadline_s: float = 30.0) -> None:
    """`n` requests in a row succeed through the proxy *with* a KV transfer (not a local prefill)."""
    end = time.monotonic() + deadline_s
    ok, last = 0, ""
    with httpx.Client(timeout=30) as client:
        while ok < n:
            before = _counter(topo, "pdserve_kv_transfers_total")
            try:
                r = client.post(
                    f"{topo.url}/v1/completions", json={"prompt": list(range(1, 40)), "max_tokens": 4, "temperature": 0}
                )
                moved = _counter(topo, "pdserve_kv_transfers_total") > before
                ok = ok + 1 if r.status_code == 200 and moved else 0
                last = f"HTTP {r.status_code}, KV moved: {moved}: {r.text[:200]}"
            except httpx.HTTPError as e:
                ok, last = 0, str(e)
            if ok < n:
                assert time.monotonic() < end, f"no request over the KV path after {deadline_s} s: {last}"
                time.sleep(0.3)


def _ss(ns: str, *args: str) -> list[list[str]]:
    """`ss -tn` rows of namespace `ns`: state, recv-q, send-q, local, peer."""
    out = subprocess.run(["ss", "-N", ns, "-Htn", *args], capture_output=True, text=True, check=True, timeout=15)
    return [line.split() for line in out.stdout.splitlines() if line.strip()]


def kv_data_address(lab: Lab, topo: RunningTopology, role: str) -> str:
    """`host:port` of the TCP KV data server of the instance of `role`: its listener on the KV link
    that is neither its handshake nor its notify port."""
    inst = next(c for c in topo.instances if c.role == role)
    info = httpx.get(f"{inst.url}/kv_info", timeout=5).json()
    ns = lab.ns_a if role == "prefill" else lab.ns_b
    others = {f"{info['host']}:{info['handshake_port']}", f"{info['host']}:{info['notify_port']}"}
    data = [row[3] for row in _ss(ns, "-l") if row[3].startswith(f"{info['host']}:") and row[3] not in others]
    assert len(data) == 1, f"expected one KV data listener on {info['host']} in {ns}: {data}"
    return data[0]


def queued(ns: str, address: str) -> list[str]:
    """Sockets in `ns` to or from `address` with bytes not yet acknowledged (their own, or orphans:
    closed by their process, still sending)."""
    return [" ".join(row[:5]) for row in _ss(ns, "-a") if address in row[3:5] and int(row[2]) > 0]


def wait_in_flight(lab: Lab, data: str, timeout_s: float = 5.0) -> list[str]:
    """Until KV bytes are on their way from A (the prefill) over the KV link; [] when none was seen."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        rows = queued(lab.ns_a, data)
        if rows:
            return rows
        time.sleep(0.02)
    return []


def orphaned_server_connections(server_ns: str, data: str, client_ns: str, timeout_s: float = 30.0) -> list[str]:
    """Connections of the data server at `data` whose client socket no longer exists (its reset was
    lost on the cut link), after waiting up to `timeout_s` for keepalive to drop them."""
    end = time.monotonic() + timeout_s
    while True:
        clients = {row[3] for row in _ss(client_ns, "-a")}
        rows = [
            " ".join(r[:5]) for r in _ss(server_ns, "-a") if r[3] == data and r[0] != "LISTEN" and r[4] not in clients
        ]
        if not rows or time.monotonic() > end:
            return rows
        time.sleep(0.5)


def _logs(topo: RunningTopology) -> str:
    return "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail(15)}" for c in topo.children)


def test_kv_link_cut_under_load(across, fault_size):
    lab, topo = across
    clients, settle = fault_size
    write = topo.spec.kv_mode == "write"
    side = "b" if write else "a"  # the far end from the instance that waits for the transfer
    # The KV bytes go from A to B: to the decode's data server (write), from the prefill's (read).
    data = kv_data_address(lab, topo, "decode" if write else "prefill")
    waiter_ns = lab.ns_a if write else lab.ns_b  # the instance that waits for the transfer, and gives it up
    failures = ("pdserve_kv_load_failures_total", "pdserve_kv_handshake_failures_total")
    try:
        with Load(topo.url, clients) as load:
            time.sleep(settle)
            hit_before = sum(_counter(topo, m) for m in failures)
            assert _counter(topo, "pdserve_kv_transfers_total") > 0, "no KV transfer: the load does not use the link"
            in_flight = wait_in_flight(lab, data) if lab.shaped else []
            assert in_flight or not lab.shaped, "no KV transfer in flight to cut within 5 s"
            lab.set_kv_link(side, "down")
            t_down = time.monotonic()
            try:
                time.sleep(DOWN_S)
                # Every transfer tried during the cut has been given up by now (DOWN_S > timeout).
                left = [r for r in queued(waiter_ns, data) if r.split()[4] == data]
            finally:
                lab.set_kv_link(side, "up")
            t_up = time.monotonic()
            moved_at_up = _counter(topo, "pdserve_kv_transfers_total")
            while _counter(topo, "pdserve_kv_transfers_total") <= moved_at_up:
                assert time.monotonic() - t_up < RECOVER_S, f"no KV transfer within {RECOVER_S:g} s of the link up"
                time.sleep(0.2)
            resumed_s = time.monotonic() - t_up
            time.sleep(settle)
        outcomes = load.outcomes
        assert_bounded(outcomes)
        slow = [o for o in outcomes if o.seconds > CUT_BOUND_S]
        assert not slow, (
            f"{len(slow)} requests took over {CUT_BOUND_S:g} s (waited for the link?): "
            f"{[(round(o.seconds, 1), o.error) for o in slow[:3]]}"
        )
        during = [o for o in outcomes if o.end > t_down and o.start < t_up]
        before = [o for o in outcomes if o.end <= t_down]
        hit = sum(_counter(topo, m) for m in failures) - hit_before
        print(
            f"[link cut] {topo.spec.kv_mode}: cut with {len(in_flight)} KV transfer(s) in flight"
            f"{'' if lab.shaped else ' (link not shaped: the cut came at a random moment)'}; "
            f"{side.upper()}'s end down {DOWN_S:g} s; {sum(o.error is not None for o in before)} of {len(before)} "
            f"requests before the cut ended with an error, {sum(o.error is not None for o in during)} of "
            f"{len(during)} overlapping it; {hit:g} KV load/handshake failures; KV transfers resumed "
            f"{resumed_s:.2f} s after the link came up"
        )
        assert hit > 0 or any(o.error for o in during), "the cut hit no transfer"
        # A write given up must leave no bytes that the link, once back, still delivers: they would land
        # in decode blocks freed since and given to another request. (In read mode what is left is a
        # read request, whose answer goes to a closed socket: harmless, not checked.)
        assert not (write and left), f"writes given up during the cut still have bytes queued for {data}: {left}"
        kv_path_ok(topo)
        blocks_back(*topo.instances)
        around = [o for o in outcomes if o.error is None and o.end > t_down]
        differ = texts_that_differ(next(c for c in topo.instances if c.role == "decode").url, around)
        print(f"[link cut] {len(around)} requests served during or after the cut asked again: {len(differ)} differ")
        assert not differ, (
            f"{len(differ)} of {len(around)} requests were served other text than the decode "
            f"computes alone (wrong KV), e.g. {[(len(o.prompt), o.text[:20]) for o in differ[:3]]}"
        )
        # A connection whose client vanished during the cut may not keep its server thread forever.
        server_ns, client_ns = (lab.ns_b, lab.ns_a) if write else (lab.ns_a, lab.ns_b)
        stuck = orphaned_server_connections(server_ns, data, client_ns)
        assert not stuck, f"the KV data server at {data} still serves clients that are gone: {stuck}"
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_logs(topo)}") from None
