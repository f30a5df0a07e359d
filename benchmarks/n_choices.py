"""What `n > 1` costs with the prompt computed once (prefix caching on: choices after the first
start from the cache) against computed per choice (--no-enable-prefix-caching), same run.

    .venv/bin/python benchmarks/n_choices.py [--n 4] [--input-len 1024] [--output-len 32]

One `pdserve serve` at a time on core 0 (one thread), the official `openai` client; per setting,
a warm-up then `--repeats` requests of `--n` choices (fresh random prompts each time, so only the
request's own choices can share its prompt). Reported: the median latency of the whole request
and of an n = 1 request of the same shape, and their ratio (ideal: close to 1 when the prompt
dominates and is computed once).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.launch import Topology, TopologySpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:qwen3-cpu-bench")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rng = random.Random(0)
    out: dict = {
        "command": "benchmarks/n_choices.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "json"),
        "machine": f"{platform.processor() or platform.machine()}, one instance on core 0",
        "date": time.strftime("%Y-%m-%d"),
    }
    for name, extra in (("caching_on", ()), ("caching_off", ("--no-enable-prefix-caching",))):
        spec = TopologySpec(kind="standard", model=a.model, instances=1, cpu_map=((0,),), engine_args=extra,
                            run_dir=tempfile.mkdtemp(prefix=f"n-choices-{name}-"))
        with Topology(spec) as topo:
            client = openai.OpenAI(base_url=topo.url + "/v1", api_key="unused", max_retries=0, timeout=600)

            def timed(n: int, client: openai.OpenAI = client) -> float:
                prompt = [rng.randrange(256) for _ in range(a.input_len)]
                t0 = time.perf_counter()
                r = client.completions.create(model=a.model, prompt=prompt, max_tokens=a.output_len, n=n,
                                              temperature=1.0, seed=1, extra_body={"ignore_eos": True})
                assert len(r.choices) == n
                return time.perf_counter() - t0

            timed(a.n)  # warm-up
            one = statistics.median(timed(1) for _ in range(a.repeats))
            many = statistics.median(timed(a.n) for _ in range(a.repeats))
        out[name] = {"n1_s": one, f"n{a.n}_s": many, "ratio": many / one}
    out["n_request_on_vs_off"] = out["caching_on"][f"n{a.n}_s"] / out["caching_off"][f"n{a.n}_s"]
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
