"""A sweep's phase breakdown on a real server: its /metrics scraped around each rate's timed
requests, so the warm-up is not counted, and every phase of a standalone instance is there."""

from __future__ import annotations

from pathlib import Path

from pdserve.bench.phases import Target
from pdserve.bench.runner import BenchConfig
from pdserve.bench.sweep import SweepConfig, run_rates
from pdserve.bench.workload import WorkloadConfig
from tests.e2e.conftest import pdserve_server

N, WARMUP = 4, 2


def test_breakdown_counts_the_timed_requests_of_each_rate(tmp_path: Path) -> None:
    workload = WorkloadConfig(num_prompts=N, input_len=24, output_len=4)
    cfg = SweepConfig(model="", bench=BenchConfig(base_url="", workload=workload, timeout_s=60), rates=(8.0, 16.0),
                      topologies=("standalone",), warmup=WARMUP)
    with pdserve_server(tmp_path) as server:
        targets = (Target("standalone-0", "standalone", server.base_url),)
        points, error = run_rates(cfg, "standalone", server.base_url, lambda _msg: None, targets)
        unlisted, _ = run_rates(cfg, "standalone", server.base_url, lambda _msg: None)  # not a proxy: no /instances
    assert error is None and len(points) == 2
    for p in points:
        b = p.phases
        assert b is not None and not b.skipped and b.roles() == ("standalone",)
        assert {m.phase: m.count for m in b.means} == {"queue": N, "prefill": N, "decode": N, "ttft": N}
        assert b.mean_s("standalone", "decode") > 0 and b.mean_s("standalone", "prefill") > 0
        client_ttft = sum(r.ttft for r in p.records if r.ttft is not None) / N
        assert b.mean_s("standalone", "ttft") < client_ttft  # the same requests, seen from inside
    assert all(p.phases is None for p in unlisted)
