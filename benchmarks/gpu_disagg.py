"""gpu_check.py's disagg stage: prefill and decode as two `pdserve serve` processes on one GPU.

A standalone instance gives the reference; per KV mode (read, write) a prefill and a decode
instance are started (in parallel) with --kv-transport cuda_ipc (on CPU, for the smoke test:
shm), CUDA graphs on, in --disagg-dtype (float32 by default: the decode instance recomputes the
last prompt token in a one-row step, which in bf16 rounds differently from the standalone's
prefill chunk, so bf16 greedy texts drift apart even when every KV byte arrived). Then, playing
the proxy's part (pdserve.bench.pd_direct):

- sequential: `n` greedy requests, each through prefill then decode, decode streamed: texts must
  equal the standalone's (same requests, one at a time on both sides), TTFT and ITL recorded;
- concurrent: the same requests `concurrency` at a time, TTFT and ITL only (batches differ from
  the standalone's, so bf16 texts may too);
- both role: two `--role both` instances, A and B; the requests one at a time in READ (A prefills,
  B decodes), then in WRITE (B prefills, A decodes), so each instance serves both halves; texts
  must equal the standalone's.

TTFT is from the first POST (prefill's; in write mode both go at once) to the first decode chunk.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pdserve.bench import pd_direct
from pdserve.bench.local_servers import servers


def sizes(quick: bool) -> dict:
    if quick:
        return dict(prompt_len=100, max_tokens=16, n=3, concurrency=2, max_model_len=1024, blocks=256)
    return dict(prompt_len=1000, max_tokens=64, n=8, concurrency=4, max_model_len=4096, blocks=1024)


def ms(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"p50_ms": 1e3 * statistics.median(v), "p90_ms": 1e3 * v[min(len(v) - 1, int(0.9 * len(v)))],
            "mean_ms": 1e3 * statistics.mean(v), "n": len(v)}


def timings(results: list[pd_direct.Timed]) -> dict:
    """TTFT; ITL as the gaps between chunk arrivals the client sees (as vLLM's bench), and TPOT per
    request (first to last chunk over the gaps), which bursts of chunks do not skew. Each request's
    TTFT too, in submission order (is a slow phase one stall or every request?)."""
    tpot = [sum(r.itl_s) / len(r.itl_s) for r in results if r.itl_s]
    return {"ttft": ms([r.ttft_s for r in results]), "itl": ms([g for r in results for g in r.itl_s]),
            "tpot": ms(tpot), "ttft_each_ms": [round(1e3 * r.ttft_s, 1) for r in results]}


def run(a, rec) -> None:
    s = sizes(a.quick)
    cuda = a.device.startswith("cuda")
    transport = "cuda_ipc" if cuda else "shm"
    common = [a.disagg_model, "--device", a.device, "--dtype", a.disagg_dtype, "--max-model-len",
              str(s["max_model_len"]), "--num-kv-blocks", str(s["blocks"]), "--max-num-seqs", "16", "--threads", "2"]
    g = torch.Generator().manual_seed(0)
    bodies = [{"model": a.disagg_model, "prompt": torch.randint(0, 256, (s["prompt_len"],), generator=g).tolist(),
               "max_tokens": s["max_tokens"], "temperature": 0, "ignore_eos": True} for _ in range(s["n"])]
    rec["setup"] = {"model": a.disagg_model, "dtype": a.disagg_dtype, "transport": transport, **s}
    logdir = Path(tempfile.mkdtemp(prefix="gpu_disagg_"))
    summary: list[str] = []
    out: dict = {}
    pool = concurrent.futures.ThreadPoolExecutor(s["concurrency"])
    with servers({"standalone": common}, logdir) as sa:
        url = sa["standalone"].url
        ref = [pd_direct.standalone(url, b) for b in bodies]
        out["standalone"] = {"sequential": timings(ref),
                             "concurrent": timings(list(pool.map(lambda b: pd_direct.standalone(url, b), bodies)))}
    rec["results"] = out
    for mode in ("read", "write"):
        flags = ["--kv-mode", mode, "--kv-transport", transport]
        specs = {f"prefill-{mode}": [*common, "--role", "prefill", *flags],
                 f"decode-{mode}": [*common, "--role", "decode", *flags]}
        t0 = time.monotonic()
        with servers(specs, logdir) as sv:
            start_s = time.monotonic() - t0
            p, d = sv[f"prefill-{mode}"].url, sv[f"decode-{mode}"].url
            seq = [pd_direct.disagg(p, d, b, mode) for b in bodies]
            equal = sum(x.text == y.text for x, y in zip(seq, ref, strict=True))
            conc = list(pool.map(lambda b, p=p, d=d, mode=mode: pd_direct.disagg(p, d, b, mode), bodies))
        out[mode] = {"outputs_equal": f"{equal}/{len(ref)}", "all_equal": equal == len(ref),
                     "servers_start_s": start_s, "sequential": timings(seq), "concurrent": timings(conc)}
        rec["results"] = out
    pool.shutdown()
    flags = ["--role", "both", "--kv-mode", "read", "--kv-transport", transport]
    t0 = time.monotonic()
    with servers({"both-a": [*common, *flags], "both-b": [*common, *flags]}, logdir) as sv:
        start_s = time.monotonic() - t0
        a_url, b_url = sv["both-a"].url, sv["both-b"].url
        both = {"read": [pd_direct.disagg(a_url, b_url, b, "read") for b in bodies],
                "write": [pd_direct.disagg(b_url, a_url, b, "write") for b in bodies]}
    for mode, seq in both.items():
        equal = sum(x.text == y.text for x, y in zip(seq, ref, strict=True))
        out[f"both-{mode}"] = {"outputs_equal": f"{equal}/{len(ref)}", "all_equal": equal == len(ref),
                               "servers_start_s": start_s, "sequential": timings(seq)}
    rec["results"] = out
    rec["all_equal"] = all(r["all_equal"] for r in out.values() if "all_equal" in r)
    for name, r in out.items():
        eq = f"equal {r['outputs_equal']}; " if "outputs_equal" in r else ""
        for kind in ("sequential", "concurrent"):
            if kind not in r:
                continue
            t = r[kind]
            summary.append(f"{name:10s} {kind:10s} {eq}TTFT p50 {t['ttft']['p50_ms']:.1f} ms "
                           f"p90 {t['ttft']['p90_ms']:.1f} ms, ITL p50 {t['itl']['p50_ms']:.2f} ms "
                           f"p90 {t['itl']['p90_ms']:.2f} ms, TPOT p50 {t['tpot']['p50_ms']:.2f} ms")
    rec["summary"] = summary
    if not rec["all_equal"]:
        raise AssertionError("disaggregated outputs differ from standalone")
