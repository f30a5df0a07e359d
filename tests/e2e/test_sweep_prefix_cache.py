"""A sweep drives one server at several rates: no rate may find its prompts in the prefix cache an
earlier rate (or the warm-up) filled, or later rates would be measured with free prefills. Each
rate gets its own prompts; only a --random-prefix-len prefix is shared, by design."""

from __future__ import annotations

from pathlib import Path

from pdserve.bench.runner import BenchConfig
from pdserve.bench.sweep import SweepConfig, run_rates
from pdserve.bench.workload import WorkloadConfig
from tests.e2e.conftest import pdserve_server

PREFIX, INPUT, N = 32, 40, 6  # 72-token prompts: 4 full blocks, of which the first 2 are the prefix


def test_rates_never_reuse_each_others_prompts(tmp_path: Path) -> None:
    workload = WorkloadConfig(num_prompts=N, input_len=INPUT, output_len=4, prefix_len=PREFIX)
    cfg = SweepConfig(model="", bench=BenchConfig(base_url="", workload=workload, timeout_s=60), rates=(4.0, 8.0),
                      topologies=("standalone",), warmup=2)
    with pdserve_server(tmp_path) as server:
        points, error = run_rates(cfg, "standalone", server.base_url, log=lambda _msg: None)
        m = server.metrics()
    assert error is None and [p.rate for p in points] == [4.0, 8.0]
    assert all(p.result.metrics.completed == N for p in points)
    queries, hits = m["pdserve_prefix_cache_queries_total"], m["pdserve_prefix_cache_hits_total"]
    assert queries == (2 + 2 * N) * (PREFIX + INPUT)  # every request was looked up
    assert 0 < hits <= (1 + 2 * N) * PREFIX  # at most the shared prefix, never a whole earlier prompt
    # The bench reads the same from each response's usage (the warm-up's are not counted).
    cached = [p.result.metrics.total_cached_input for p in points if p.result is not None]
    assert 0 < sum(cached) <= hits and all(c % 16 == 0 for c in cached)
