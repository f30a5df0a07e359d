"""`pdserve bench`: the client side of the benchmark lab (no torch; any OpenAI-compatible server).

workload.py  random prompts, arrival times    sse.py      SSE framing of a completions / chat stream
datasets.py  ShareGPT / custom files         prompts.py  a run's requests (dataset samples, chat text)
tokenizer.py the server's /tokenize or a local tokenizer (counting a dataset's tokens)
client.py    one streamed, timestamped request   runner.py   run_benchmark(BenchConfig) -> BenchResult
metrics.py   aggregates, SLOs, request_goodput   goodput.py  DistServe goodput, primary failure mode
report.py    vLLM-named JSON, summary table      plots.py    per-request bars, attainment vs rate
phases.py    per-role phase means from /metrics  phase_report.py / phase_plots.py  their table, figure
command.py   the `bench` subcommand
"""

from pdserve.bench.runner import BenchConfig, BenchResult, run_benchmark

__all__ = ["BenchConfig", "BenchResult", "run_benchmark"]
