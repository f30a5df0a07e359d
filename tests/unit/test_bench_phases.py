"""The phase breakdown: histogram deltas between two scrapes -> mean seconds per phase per role,
its table, figure and JSON, and the probe that finds a proxy's instances."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pdserve.bench.phase_plots import plot_phases
from pdserve.bench.phase_report import phase_table
from pdserve.bench.phases import (
    Breakdown,
    PhaseProbe,
    Scrape,
    Target,
    breakdown,
    discover,
    histogram_totals,
)

PROXY = Target("proxy", "proxy", "http://p")
P0 = Target("prefill-0", "prefill", "http://a")
D0 = Target("decode-0", "decode", "http://b")
D1 = Target("decode-1", "decode", "http://c")


def hist(name: str, total: float, count: int, labels: str = "") -> str:
    """One histogram family in exposition text (one bucket: +Inf)."""
    lab = "{" + labels + "}" if labels else ""
    inf = "{" + (labels + "," if labels else "") + 'le="+Inf"}'
    return (f"# HELP {name} x\n# TYPE {name} histogram\n{name}_bucket{inf} {count}\n"
            f"{name}_sum{lab} {total}\n{name}_count{lab} {count}\n")


def instance(queue: tuple[float, int], prefill: tuple[float, int], decode: tuple[float, int],
             kv: tuple[float, int] | None = None) -> str:
    labels = 'model_name="m",engine="0"'
    text = (hist("vllm:request_queue_time_seconds", *queue, labels)
            + hist("vllm:request_prefill_time_seconds", *prefill, labels)
            + hist("vllm:request_decode_time_seconds", *decode, labels)
            + hist("vllm:time_to_first_token_seconds", queue[0] + prefill[0], queue[1], labels)
            + "# HELP pdserve_kv_blocks_free x\n# TYPE pdserve_kv_blocks_free gauge\npdserve_kv_blocks_free 7\n")
    return text + (hist("pdserve_kv_transfer_seconds", *kv) if kv is not None else "")


def proxy(inn: tuple[float, int], out: tuple[float, int]) -> str:
    return (hist("pdserve_proxy_request_overhead_seconds", *inn)
            + hist("pdserve_proxy_response_overhead_seconds", *out))


def scrape(target: Target, text: str | None) -> Scrape:
    return Scrape(target, histogram_totals(text) if text is not None else None, "" if text else "refused")


def test_histogram_totals_add_every_label_set_and_skip_other_types() -> None:
    two_sets = hist("z", 1.0, 2, 'a="1"') + 'z_bucket{a="2",le="+Inf"} 1\nz_sum{a="2"} 0.5\nz_count{a="2"} 1\n'
    assert histogram_totals(two_sets + hist("y", 0.25, 1)) == {"z": (1.5, 3.0), "y": (0.25, 1.0)}
    totals = histogram_totals(instance((0.1, 1), (0.2, 1), (0.3, 1)))
    assert totals["vllm:request_queue_time_seconds"] == (0.1, 1.0)  # vLLM's names, labels and all
    assert "pdserve_kv_blocks_free" not in totals  # a gauge
    with pytest.raises(ValueError):
        histogram_totals("not prometheus {{{\n")


def test_means_per_phase_per_role_over_the_run_only() -> None:
    before = [scrape(PROXY, proxy((0.01, 10), (0.002, 10))), scrape(P0, instance((1.0, 10), (5.0, 10), (0.0, 10))),
              scrape(D0, instance((2.0, 5), (0.1, 5), (10.0, 5), kv=(0.2, 5))),
              scrape(D1, instance((0.0, 0), (0.0, 0), (0.0, 0), kv=(0.0, 0)))]
    after = [scrape(PROXY, proxy((0.014, 14), (0.0024, 14))), scrape(P0, instance((1.2, 14), (5.8, 14), (0.0, 14))),
             scrape(D0, instance((2.6, 7), (0.14, 7), (12.0, 7), kv=(0.26, 7))),
             scrape(D1, instance((0.6, 2), (0.04, 2), (2.0, 2), kv=(0.06, 2)))]
    b = breakdown(before, after)
    assert b.roles() == ("proxy", "prefill", "decode") and not b.skipped
    assert b.mean_s("proxy", "proxy_request") == pytest.approx(0.001)
    assert b.mean_s("proxy", "proxy_response") == pytest.approx(0.0001)
    assert b.mean_s("prefill", "queue") == pytest.approx(0.05) and b.mean_s("prefill", "prefill") == pytest.approx(0.2)
    assert b.mean_s("prefill", "decode") == pytest.approx(0.0)  # one token: observed, zero
    assert b.mean_s("prefill", "ttft") == pytest.approx(0.25)
    # both decode instances pooled: (0.6 + 0.6) s over 2 + 2 requests
    assert b.mean_s("decode", "queue") == pytest.approx(0.3) and b.get("decode", "queue").count == 4
    assert b.mean_s("decode", "decode") == pytest.approx(1.0)
    assert b.mean_s("decode", "kv_transfer") == pytest.approx(0.03)
    assert b.mean_s("prefill", "kv_transfer") is None and b.mean_s("proxy", "queue") is None
    assert b.requests("prefill") == 4 and b.requests("decode") == 4 and dict(b.instances)["decode"] == 2


def test_a_histogram_missing_before_the_run_counts_from_zero() -> None:
    before = [scrape(P0, instance((1.0, 10), (5.0, 10), (0.0, 10)))]
    after = [scrape(P0, instance((1.3, 13), (5.3, 13), (0.0, 13), kv=(0.09, 3)))]
    b = breakdown(before, after)
    assert b.mean_s("prefill", "kv_transfer") == pytest.approx(0.03) and b.get("prefill", "kv_transfer").count == 3
    assert not b.skipped


def test_counts_that_go_back_skip_that_instance_s_phase_only() -> None:
    """decode-1 restarted during the run: its counts fell; decode-0's still make the decode row."""
    before = [scrape(D0, instance((1.0, 4), (0.1, 4), (4.0, 4))),
              scrape(D1, instance((9.0, 90), (0.9, 90), (90.0, 90)))]
    after = [scrape(D0, instance((1.5, 6), (0.14, 6), (6.0, 6))), scrape(D1, instance((0.2, 1), (0.01, 1), (1.0, 1)))]
    b = breakdown(before, after)
    assert b.mean_s("decode", "queue") == pytest.approx(0.25) and b.get("decode", "queue").count == 2
    assert b.mean_s("decode", "decode") == pytest.approx(1.0)
    assert any(s.startswith("decode-1 (decode) queue: counts went back") for s in b.skipped)
    assert len([s for s in b.skipped if s.startswith("decode-1")]) == 4  # queue, prefill, decode, TTFT


def test_unreachable_or_vanished_metrics_are_noted_not_raised() -> None:
    before = [scrape(P0, instance((1.0, 10), (5.0, 10), (0.0, 10), kv=(0.1, 10))), scrape(D0, None),
              scrape(PROXY, proxy((0.0, 0), (0.0, 0)))]
    after = [scrape(P0, instance((1.1, 11), (5.5, 11), (0.0, 11))), scrape(D0, instance((0.1, 1), (0.0, 1), (1.0, 1)))]
    b = breakdown(before, after)
    assert b.roles() == ("prefill",)  # the proxy saw no request: no row
    assert "decode-0 (decode): refused" in b.skipped
    assert "prefill-0 (prefill) KV transfer: gone from /metrics" in b.skipped
    assert "proxy (proxy): not scraped after the run" in b.skipped
    empty = breakdown([scrape(D0, None)], [scrape(D0, None)])
    assert empty.means == () and empty.roles() == ()


def sample() -> Breakdown:
    before = [scrape(PROXY, proxy((0.0, 0), (0.0, 0))), scrape(P0, instance((0.0, 0), (0.0, 0), (0.0, 0)))]
    after = [scrape(PROXY, proxy((0.002, 4), (0.0004, 4))), scrape(P0, instance((0.2, 4), (0.48, 4), (0.0, 4))),
             scrape(D0, instance((0.9, 4), (0.02, 4), (1.2, 4), kv=(0.12, 4)))]
    return breakdown([*before, scrape(D0, instance((0.0, 0), (0.0, 0), (0.0, 0), kv=(0.0, 0)))], after)


def test_json_round_trip() -> None:
    b = sample()
    data = json.loads(json.dumps(b.to_json()))
    assert data["roles"]["decode"]["phases"]["kv_transfer"] == {"mean_s": pytest.approx(0.03), "count": 4,
                                                                 "sum_s": pytest.approx(0.12)}
    assert data["roles"]["proxy"]["instances"] == 1
    assert Breakdown.from_json(data) == b
    assert Breakdown.from_json({}) == Breakdown((), (), ())


def test_table_rows_per_series_rate_and_role(tmp_path: Path) -> None:
    b = sample()
    table = phase_table([("disagg-write", 2.0, b)])
    assert "| series | req/s | role | requests | proxy in | proxy out | queue | prefill | KV transfer | decode |" \
           " server TTFT |" in table
    assert "| disagg-write | 2 | proxy | 4 | 0.50 | 0.10 | - | - | - | - | - |" in table
    assert "| disagg-write | 2 | prefill | 4 | - | - | 50.0 | 120 | - | 0.00 | 170 |" in table
    assert "| disagg-write | 2 | decode | 4 | - | - | 225 | 5.00 | 30.0 | 300 | 230 |" in table
    assert phase_table([]) == ""
    noted = Breakdown((), (), ("decode-0 (decode): refused",))
    assert "- standard:1 @ 1 req/s: decode-0 (decode): refused" in phase_table([("standard:1", 1.0, noted)])
    standard = breakdown([scrape(D0, instance((0.0, 0), (0.0, 0), (0.0, 0)))],
                         [scrape(D0, instance((0.1, 1), (0.2, 1), (0.3, 1)))])
    assert "| queue | prefill | decode | server TTFT |" in phase_table([("standard:1", 1.0, standard)])  # no KV column
    path = plot_phases([("disagg-write", 2.0, b), ("standard:1", 2.0, standard), ("disagg-write", 4.0, b)],
                       tmp_path / "phases.png")
    assert path is not None and path.stat().st_size > 0
    assert plot_phases([("x", 1.0, noted)], tmp_path / "none.png") is None


async def _serve(routes: dict[str, object]) -> tuple[web.AppRunner, str]:
    """An aiohttp app answering GET `path` with `routes[path]` (text, or JSON for a list)."""
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        body = routes[request.path]
        return web.json_response(body) if isinstance(body, list) else web.Response(text=str(body))

    for path in routes:
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


def test_probe_finds_a_proxy_s_instances_and_scrapes_them() -> None:
    routes: dict[str, object] = {"/metrics": proxy((0.0, 0), (0.0, 0)),
                                 "/p/metrics": instance((0.0, 0), (0.0, 0), (0.0, 0), kv=(0.0, 0)), "/instances": []}

    async def go() -> tuple[Breakdown | None, Breakdown | None, tuple[Target, ...]]:
        runner, url = await _serve(routes)
        routes["/instances"] = [{"address": "127.0.0.1:1", "url": f"{url}/p", "role": "prefill"},
                                {"address": "127.0.0.1:9", "url": "http://127.0.0.1:9", "role": "decode"}]
        try:
            async with aiohttp.ClientSession() as session:
                probe = PhaseProbe.of_proxy(url)
                await probe.start(session)
                routes["/metrics"] = proxy((0.003, 3), (0.0003, 3))
                routes["/p/metrics"] = instance((0.3, 3), (0.6, 3), (0.0, 3), kv=(0.06, 3))
                found = await probe.finish(session)
                not_a_proxy = PhaseProbe.of_proxy(f"{url}/p")  # no /instances there
                await not_a_proxy.start(session)
                none = await not_a_proxy.finish(session)
                return found, none, await discover(session, "http://127.0.0.1:9")
        finally:
            await runner.cleanup()

    found, none, unreachable = asyncio.run(go())
    assert found is not None and found.roles() == ("proxy", "prefill")
    assert found.mean_s("proxy", "proxy_request") == pytest.approx(0.001)
    assert found.mean_s("prefill", "kv_transfer") == pytest.approx(0.02)
    assert [s.split(":")[0] for s in found.skipped] == ["127.0.0.1"]  # the decode at port 9: refused
    assert none is None and unreachable == ()


def test_sweep_records_renders_and_rereads_the_breakdown(tmp_path: Path) -> None:
    from dataclasses import replace

    from pdserve.bench.sweep import RatePoint, Series
    from pdserve.bench.sweep_command import load_results, write_outputs
    from pdserve.bench.sweep_report import markdown_summary, series_from_json, summarize
    from tests.unit.test_sweep import SERIES, cfg, with_results

    c = cfg(tmp_path)
    plain = tuple(with_results(s, c) for s in SERIES)
    measured = (plain[0], Series(plain[1].name, plain[1].kind, plain[1].base_url, tuple(
        RatePoint.of(replace(p.result, phases=sample()), 0.1) for p in plain[1].points if p.result is not None)))
    _, paths = write_outputs(c, measured)
    assert "fig5_phases.png" in {p.name for p in paths}
    data = load_results(str(tmp_path / "results.json"))
    runs = data["series"][1]["runs"]
    assert runs[0]["phases"]["roles"]["decode"]["phases"]["queue"]["count"] == 4
    assert "phases" not in data["series"][0]["runs"][0]  # standard:2 here had none (e.g. an older file)
    md = (tmp_path / "summary.md").read_text()
    assert "| disagg-write | 4 | decode | 4 | - | - | 225 | 5.00 | 30.0 | 300 | 230 |" in md
    again = series_from_json(data)
    reread = again[1].points[0].phases
    assert reread is not None and again[0].points[0].phases is None
    assert reread.roles() == sample().roles() and reread.mean_s("prefill", "ttft") == pytest.approx(0.17)
    assert markdown_summary(c, summarize(c, again)) == md
    assert "Where the time goes" not in markdown_summary(c, summarize(c, plain))
