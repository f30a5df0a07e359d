"""Offline prefill and decode throughput on ONE pinned core: pdserve vs transformers vs vLLM CPU,
and pdserve against the core's hardware limits (benchmarks/roofline.py), all in the same run.

    .venv/bin/python benchmarks/offline_throughput.py [--quick] [--core 1] [--repeats 3]
        [--models qwen3-cpu-bench qwen3-tiny] [--batch 16] [--input-len 1000] [--decode-steps 64]
        [--vllm-python /tmp/vllm-peer/bin/python] [--no-vllm] [--no-hf] [--profile]

Workload, per model (`dummy:<preset>` exported once with pdserve.model.export.export_model to a
bf16 Hugging Face directory that all three engines load): `--batch` prompts of `--input-len`
random byte tokens, greedy, EOS ignored, `--decode-steps` + 1 generated tokens each.

- pdserve: `LLM(DIR, dtype="bfloat16", threads=1, max_num_seqs=batch, max_num_batched_tokens=...)`;
  the engine is stepped by hand: the prefill phase is every step until each request has its first
  token, the decode phase is the rest. prefill tok/s = batch*input_len / prefill time; decode tok/s
  = tokens generated in the decode phase / its time.
- transformers: AutoModelForCausalLM (bf16, sdpa), the batch left-padded (equal lengths: no pads)
  with an attention mask; prefill = `generate(max_new_tokens=1)`; decode per step =
  (generate(max_new_tokens=N) - prefill) / (N - 1).
- vLLM CPU (its own venv, a subprocess that answers JSON commands on stdin, started once per model):
  `vllm.LLM(DIR, dtype="bfloat16", enable_prefix_caching=False, same max_num_seqs and
  max_num_batched_tokens)`, pinned with taskset and VLLM_CPU_OMP_THREADS_BIND to the same core,
  VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine core in-process: one process on the one core).
  Its figures come from stepping `llm.llm_engine` by hand exactly as pdserve's (prefill phase =
  steps until every request has its first token, decode phase = the rest). The two-point method,
  prefill = generate(max_tokens=1) and decode per step = (generate(max_tokens=N) - prefill) /
  (N - 1), is reported beside it as "vllm (two-point)": on a shared core the difference of two
  ~16 s runs is too noisy for the ~2.6 s decode phase (one round read a 16 ms decode step,
  below the step's linears alone), so the stepped figures are the ones targets are judged on.

Every engine runs a small untimed warm-up first, then `--repeats` timed rounds; in each round all
engines run the same fresh prompts (no prefix reuse), and the order of the engines rotates from
round to round so slow drift of the machine's load hits each alike. Figures are medians over
rounds; a ratio is the median of the per-round ratios.

Two clocks are recorded for every measurement: wall time, and the CPU time of the measured
process (time.process_time(); one pinned core, so all of its threads share that core). The
machine is shared and noisy: CPU time leaves out the time the process was not on its core, so it
is the figure used for ratios and targets ("cpu"); wall time is reported beside it ("wall").

Hardware-limit checks (qwen3-cpu-bench, pdserve, same run, CPU time): a decode step at batch 16
with 1000-token contexts vs weight bytes / single-core read bandwidth (target <= 1.5x); a
1000-token prefill vs the single-core bf16 GEMM rate (FLOPs = 2 * linear params * tokens + lm_head
for the last token + causal attention 2 * 2 * heads * head_dim * T(T+1)/2 per layer; target >=
50%); prefill(1000 tokens) / decode step(batch 16) (target >= 10x).

Results: benchmarks/results/offline_<date>[_quick].json and a Markdown section in
benchmarks/RESULTS_offline.md. `--profile` adds a torch.profiler breakdown (ms per step by op) of
pdserve's 1000-token prefill and batch-16 decode step.

Module-level imports are standard-library only: the same file runs as the vLLM worker
(`--vllm-worker DIR`) under the vLLM venv's interpreter.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
MD_PATH = REPO / "benchmarks" / "RESULTS_offline.md"
DEFAULT_VLLM_PYTHON = os.path.join(os.environ.get("TMPDIR", "/tmp"), "vllm-peer", "bin", "python")
MARK = "@@OFFLINE_BENCH "  # prefix of the vLLM worker's reply lines on stdout

# The hardware-limit targets.
DECODE_VS_BW_MAX = 1.5
PREFILL_VS_GEMM_MIN = 0.5
PREFILL_OVER_DECODE_MIN = 10.0


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> dict[str, float]:
    w, c = now()
    return {"wall": w - t[0], "cpu": c - t[1]}


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(length)] for _ in range(n)]


def median(xs: list[float]) -> float:
    """Median of the finite values (a two-point difference can come out <= 0 on a noisy wall clock)."""
    xs = [x for x in xs if x == x and x not in (float("inf"), float("-inf"))]
    return statistics.median(xs) if xs else float("nan")


def per_s(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


# ------------------------------------------------------------------------------------------------
# vLLM worker (runs under the vLLM venv; stdlib + vllm only)
# ------------------------------------------------------------------------------------------------
def _reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def vllm_worker(model_dir: str, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        if hd not in supported:
            _reply({"error": f"vLLM's CPU attention does not support head_dim={hd} (supported: {supported})"})
            return
        from vllm import LLM, SamplingParams

        t = now()
        llm = LLM(
            model=model_dir,
            dtype="bfloat16",
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=False,
            seed=0,
        )
        import vllm

        _reply({"ready": True, "startup": since(t), "version": vllm.__version__})
    except Exception as e:  # reported to the parent
        _reply({"error": f"{type(e).__name__}: {e}"})
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        prompts = [{"prompt_token_ids": p} for p in cmd["prompts"]]
        sp = SamplingParams(max_tokens=cmd["max_tokens"], temperature=0.0, ignore_eos=True)
        idle_cpu = time.process_time()
        if cmd.get("op") == "gen_stepped":
            r = _vllm_stepped(llm, prompts, sp)
        else:
            t = now()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            r = since(t)
            r["tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
        r["cpu_clock_at_start"] = idle_cpu
        _reply(r)


_vllm_ids = iter(range(1 << 62))


def _vllm_stepped(llm, prompts: list[dict], sp) -> dict:
    """Step vLLM's engine by hand, as PdserveRunner.run does: the prefill phase is every step until
    each request has its first token, the decode phase the rest."""
    eng = llm.llm_engine
    t0 = t = now()
    for p in prompts:
        eng.add_request(f"b{next(_vllm_ids)}", p, sp)
    tokens: dict[str, int] = {}
    prefill_steps = 0
    while sum(1 for n in tokens.values() if n > 0) < len(prompts):
        for o in eng.step():
            tokens[o.request_id] = len(o.outputs[0].token_ids)
        prefill_steps += 1
    prefill = since(t)
    first = sum(tokens.values())
    t = now()
    steps = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            tokens[o.request_id] = len(o.outputs[0].token_ids)
        steps += 1
    decode = since(t)
    return since(t0) | {
        "prefill": prefill,
        "decode": decode,
        "prefill_steps": prefill_steps,
        "decode_steps": steps,
        "decode_tokens": sum(tokens.values()) - first,
        "tokens": sum(tokens.values()),
    }


class VllmClient:
    """The vLLM worker subprocess, pinned to `core`."""

    def __init__(self, python: str, model_dir: str, core: int, args: argparse.Namespace, log_path: Path) -> None:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib),
            VLLM_CPU_OMP_THREADS_BIND=str(core),
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
        )
        env.pop("PYTHONPATH", None)
        cmd = [
            "taskset", "-c", str(core), python, str(Path(__file__).resolve()), "--vllm-worker", model_dir,
            "--max-num-seqs", str(args.batch), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-model-len", str(args.max_model_len),
        ]  # fmt: skip
        self.log = open(log_path, "w", buffering=1)  # closed in close()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd="/"
        )
        self.hello = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            self.log.write(line)
        return {"error": f"vLLM worker exited (rc={self.proc.wait()}); see {self.log.name}"}

    def generate(self, prompts: list[list[int]], max_tokens: int, stepped: bool = False) -> dict:
        assert self.proc.stdin is not None
        op = "gen_stepped" if stepped else "gen"
        self.proc.stdin.write(json.dumps({"op": op, "prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        if "error" in r:
            raise RuntimeError(r["error"])
        return r

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------------
# The three engines, one timed round each
# ------------------------------------------------------------------------------------------------
class PdserveRunner:
    name = "pdserve"

    def __init__(self, model_dir: str, args: argparse.Namespace) -> None:
        from pdserve import LLM

        blocks_per_seq = -(-(args.max_model_len) // 16)
        self.llm = LLM(
            model_dir,
            dtype="bfloat16",
            threads=1,
            max_num_seqs=args.batch,
            max_num_batched_tokens=args.max_num_batched_tokens,
            num_kv_blocks=args.batch * blocks_per_seq + 16,
            max_model_len=args.max_model_len,
            enable_prefix_caching=False,  # as vLLM's run: rounds repeat the prompts, every one computed
        )
        self.n = 0

    def run(self, prompts: list[list[int]], decode_steps: int) -> dict:
        """Prefill then `decode_steps` decode steps; per-phase times and per-decode-step times."""
        from pdserve import SamplingParams

        eng = self.llm.engine
        sp = SamplingParams(max_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)
        t = now()
        for p in prompts:
            self.n += 1
            eng.add_request(f"r{self.n}", p, sp)
        first: set[str] = set()
        prefill_steps = 0
        while len(first) < len(prompts):
            for o in eng.step():
                if o.new_token_ids:
                    first.add(o.request_id)
            prefill_steps += 1
        prefill = since(t)
        t = now()
        steps = []
        tokens = 0
        while eng.has_unfinished():
            ts = now()
            outs = eng.step()
            steps.append(since(ts))
            tokens += sum(len(o.new_token_ids) for o in outs)
        decode = since(t)
        return {
            "prefill": prefill,
            "decode": decode,
            "prefill_tokens": sum(len(p) for p in prompts),
            "prefill_steps": prefill_steps,
            "decode_tokens": tokens,
            "decode_steps": len(steps),
            "step_wall": [s["wall"] for s in steps],
            "step_cpu": [s["cpu"] for s in steps],
        }

    def prefill_only(self, prompt: list[int]) -> dict:
        """One prompt, one token: the time of the engine steps until its first token."""
        from pdserve import SamplingParams

        eng = self.llm.engine
        self.n += 1
        t = now()
        eng.add_request(f"r{self.n}", prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
        return since(t)

    def close(self) -> None:
        self.llm.close()


def _two_point(prefill: dict, total: dict, prompts: list[list[int]], decode_steps: int) -> dict:
    """prefill = run(max 1 token); decode = (run(max N) - prefill), N - 1 = decode_steps per sequence."""
    return {
        "prefill": prefill,
        "decode": {k: total[k] - prefill[k] for k in ("wall", "cpu")},
        "total": total,
        "prefill_tokens": sum(len(p) for p in prompts),
        "decode_tokens": len(prompts) * decode_steps,
        "decode_steps": decode_steps,
    }


class HfRunner:
    name = "transformers"

    def __init__(self, model_dir: str, args: argparse.Namespace) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
        self.model.eval()
        gc = self.model.generation_config
        gc.eos_token_id = None  # ignore EOS: exactly max_new_tokens tokens
        gc.pad_token_id = 0
        gc.do_sample = False
        self.version = transformers.__version__

    def _batch(self, prompts: list[list[int]]):
        """Left padding to the longest prompt, with the attention mask."""
        torch = self.torch
        n = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        return ids, mask

    def _gen(self, prompts: list[list[int]], n: int) -> dict:
        ids, mask = self._batch(prompts)
        with self.torch.inference_mode():
            t = now()
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
            r = since(t)
        assert out.shape[1] == ids.shape[1] + n, out.shape
        return r

    def run(self, prompts: list[list[int]], decode_steps: int) -> dict:
        return _two_point(self._gen(prompts, 1), self._gen(prompts, decode_steps + 1), prompts, decode_steps)

    def close(self) -> None:
        del self.model


class VllmRunner:
    name = "vllm"

    def __init__(self, client: VllmClient) -> None:
        self.client = client

    def run(self, prompts: list[list[int]], decode_steps: int) -> dict:
        """Phases from a stepped run (the method pdserve's figures use); the two-point figures
        (generate(max_tokens=1), generate(max_tokens=N) - that) beside them under "two_point"."""
        p = self.client.generate(prompts, 1)
        t = self.client.generate(prompts, decode_steps + 1, stepped=True)
        assert t["tokens"] == len(prompts) * (decode_steps + 1), t
        total = {k: t[k] for k in ("wall", "cpu")}
        r = {
            "prefill": t["prefill"],
            "decode": t["decode"],
            "prefill_tokens": sum(len(x) for x in prompts),
            "prefill_steps": t["prefill_steps"],
            "decode_tokens": t["decode_tokens"],
            "decode_steps": t["decode_steps"],
            "two_point": _two_point(p, total, prompts, decode_steps),
            "worker_cpu_between_runs": t["cpu_clock_at_start"] - (p["cpu_clock_at_start"] + p["cpu"]),
        }
        return r

    def close(self) -> None:
        self.client.close()


def rates(run: dict) -> dict:
    """tok/s of one round, per clock."""
    out = {}
    for clock in ("wall", "cpu"):
        out[f"prefill_tok_s_{clock}"] = per_s(run["prefill_tokens"], run["prefill"][clock])
        out[f"decode_tok_s_{clock}"] = per_s(run["decode_tokens"], run["decode"][clock])
    return out


def summarize(rounds: list[dict]) -> dict:
    per = [rates(r) for r in rounds]
    return {k: median([p[k] for p in per]) for k in per[0]} | {"rounds": len(rounds)}


# ------------------------------------------------------------------------------------------------
# Model facts for the hardware checks
# ------------------------------------------------------------------------------------------------
def weight_bytes(model_dir: str) -> int:
    """Bytes of every tensor in the checkpoint (tied embeddings counted once, as lm_head reads them)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * 2  # bf16
    return total


def prefill_flops(cfg: dict, tokens: int) -> dict:
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    linear_params = layers * (h * heads * hd + 2 * h * kvh * hd + heads * hd * h + 3 * h * inter)
    linear = 2 * linear_params * tokens
    lm_head = 2 * h * cfg["vocab_size"]  # the last token's logits only
    attention = layers * 2 * 2 * heads * hd * tokens * (tokens + 1) // 2  # QK^T and PV, causal
    return {
        "linear_params": linear_params,
        "linear": linear,
        "lm_head": lm_head,
        "attention": attention,
        "total": linear + lm_head + attention,
    }


def kv_bytes_per_token(cfg: dict) -> int:
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * hd * 2


# ------------------------------------------------------------------------------------------------
# Profile (pdserve)
# ------------------------------------------------------------------------------------------------
class ComponentTimer:
    """CPU time per pdserve component: wraps functions (in this process only) with nested timers.

    `exclusive` is a component's time minus the time of the wrapped components it called, so the
    exclusive times add up to the wrapped total.
    """

    def __init__(self) -> None:
        self.inclusive: dict[str, float] = {}
        self.exclusive: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []  # [child time] per open frame
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, name: str) -> None:
        fn = getattr(owner, attr)
        timer = self

        def wrapped(*a, **k):
            timer._stack.append([0.0])
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                dt = time.process_time() - t0
                child = timer._stack.pop()[0]
                timer.inclusive[name] = timer.inclusive.get(name, 0.0) + dt
                timer.exclusive[name] = timer.exclusive.get(name, 0.0) + dt - child
                timer.calls[name] = timer.calls.get(name, 0) + 1
                if timer._stack:
                    timer._stack[-1][0] += dt

        self._undo.append((owner, attr, fn))
        setattr(owner, attr, wrapped)

    def install(self) -> ComponentTimer:
        from pdserve.engine import engine, runner, sampler, scheduler
        from pdserve.model import attention, cpu_linear, decoder, rope

        self.wrap(engine.LLMEngine, "step", "engine.step (all)")
        self.wrap(engine.LLMEngine, "_process", "engine._process (detokenize, outputs)")
        self.wrap(scheduler.Scheduler, "schedule", "scheduler.schedule")
        self.wrap(scheduler.Scheduler, "update_after_step", "scheduler.update_after_step")
        self.wrap(runner.ModelRunner, "build", "runner.build (batch tensors, metadata)")
        self.wrap(sampler.Sampler, "prepare", "sampler.prepare")
        self.wrap(sampler.Sampler, "__call__", "sampler (argmax)")
        self.wrap(decoder.DecoderForCausalLM, "forward", "model.forward (embedding, residual adds, views)")
        self.wrap(decoder.DecoderForCausalLM, "compute_logits", "compute_logits (.float())")
        self.wrap(cpu_linear.PackedLinear, "forward", "linear (oneDNN packed)")
        self.wrap(decoder.RMSNorm, "forward", "rms_norm")
        self.wrap(rope.RotaryEmbedding, "__call__", "rope table lookup")
        self.wrap(decoder, "apply_rope", "apply_rope")
        self.wrap(decoder.GatedMLP, "forward", "mlp elementwise (silu, mul)")
        self.wrap(decoder.SelfAttention, "forward", "attention block glue (views, reshape)")
        self.wrap(decoder, "paged_attention", "paged_attention glue (out buffer, slicing)")
        self.wrap(attention, "write_kv", "write_kv (index_copy_)")
        self.wrap(attention, "_gather", "decode: _gather KV blocks (index_select)")
        self.wrap(attention, "_decode_attention", "decode: attention math (matmul, softmax)")
        self.wrap(attention, "_prefill_attention", "prefill: attention (blocked GEMMs)")
        return self

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()

    def table(self, steps: int) -> list[dict]:
        rows = [
            {
                "component": n,
                "exclusive_ms_per_step": self.exclusive[n] * 1e3 / steps,
                "inclusive_ms_per_step": self.inclusive[n] * 1e3 / steps,
                "calls_per_step": self.calls[n] / steps,
            }
            for n in self.exclusive
        ]
        return sorted(rows, key=lambda r: -r["exclusive_ms_per_step"])


def profile_pdserve(
    runner: PdserveRunner, batch: int, ctx: int, steps: int, seed: int, workload: tuple[int, int] | None = None
) -> dict:
    """CPU time by component (ComponentTimer) and torch.profiler's top ops (wall clock, inflated
    when the core is shared), over one `ctx`-token prefill and `steps` decode steps at batch x ctx."""
    from torch.profiler import ProfilerActivity, profile

    from pdserve import SamplingParams

    def ops_table(prof, n_steps: int) -> list[dict]:
        rows = [
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / 1000 / n_steps,
                "total_ms_per_step": e.cpu_time_total / 1000 / n_steps,
                "calls_per_step": e.count / n_steps,
            }
            for e in prof.key_averages()
        ]
        rows.sort(key=lambda r: -r["self_ms_per_step"])
        return rows[:20]

    out: dict = {}
    if workload:  # the benchmark's whole prefill phase (batch x input_len), by component
        timer = ComponentTimer().install()
        try:
            r = runner.run(make_prompts(workload[0], workload[1], seed + 4), 0)
        finally:
            timer.uninstall()
        out["workload_prefill"] = r["prefill"] | {"steps": r["prefill_steps"], "batch": workload[0], "len": workload[1]}
        out["workload_prefill_components"] = [
            {k: (v * r["prefill_steps"] if k.endswith("per_step") else v) for k, v in row.items()}
            for row in timer.table(r["prefill_steps"])
        ]
    runner.prefill_only(make_prompts(1, ctx, seed)[0])  # warm
    timer = ComponentTimer().install()
    try:
        t = now()
        runner.prefill_only(make_prompts(1, ctx, seed + 1)[0])
        out["prefill_step"] = since(t)
        out["prefill_components"] = timer.table(1)
    finally:
        timer.uninstall()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.prefill_only(make_prompts(1, ctx, seed + 2)[0])
    out["prefill_ops"] = ops_table(prof, 1)

    eng = runner.llm.engine
    sp = SamplingParams(max_tokens=2 * steps + 4, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(make_prompts(batch, ctx, seed + 3)):
        eng.add_request(f"prof{i}", p, sp)
    while eng.stats().num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running):
        eng.step()
    eng.step()  # a warm decode step
    timer = ComponentTimer().install()
    try:
        t = now()
        for _ in range(steps):
            eng.step()
        d = since(t)
        out["decode_components"] = timer.table(steps)
    finally:
        timer.uninstall()
    out["decode_step"] = {k: v / steps for k, v in d.items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    out["decode_ops"] = ops_table(prof, steps)
    while eng.has_unfinished():
        eng.step()
    return out


def print_profile(p: dict) -> None:
    if "workload_prefill" in p:
        w = p["workload_prefill"]
        print(
            f"\n  profile: pdserve workload prefill ({w['batch']} x {w['len']} tokens, {w['steps']} step(s)): "
            f"cpu {w['cpu']:.2f} s (wall {w['wall']:.2f} s)"
        )
        for r in p["workload_prefill_components"][:10]:
            print(f"    {r['component'][:52]:<52} {r['exclusive_ms_per_step']:>12.1f} ms")
    for phase in ("prefill", "decode"):
        st = p[f"{phase}_step"]
        print(f"\n  profile: pdserve {phase} step: cpu {st['cpu'] * 1e3:.1f} ms (wall {st['wall'] * 1e3:.1f} ms)")
        print(f"    {'component (CPU time)':<52} {'excl ms/step':>12} {'incl ms/step':>12} {'calls':>6}")
        for r in p[f"{phase}_components"]:
            print(
                f"    {r['component'][:52]:<52} {r['exclusive_ms_per_step']:>12.2f} "
                f"{r['inclusive_ms_per_step']:>12.2f} {r['calls_per_step']:>6.0f}"
            )
        print(f"    {'torch.profiler op (wall clock)':<52} {'self ms/step':>12} {'total ms/step':>12} {'calls':>6}")
        for r in p[f"{phase}_ops"][:12]:
            print(
                f"    {r['op'][:52]:<52} {r['self_ms_per_step']:>12.2f} {r['total_ms_per_step']:>12.2f} "
                f"{r['calls_per_step']:>6.0f}"
            )


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------
def bench_model(preset: str, args: argparse.Namespace, roof, workdir: Path) -> dict:
    from pdserve.model.export import export_model

    print(f"\n=== {preset} ===", flush=True)
    model_dir = str(workdir / preset)
    export_model(f"dummy:{preset}", model_dir, "bfloat16", seed=0)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    res: dict = {"model": f"dummy:{preset}", "export_dir": model_dir, "config": cfg}

    runners: list = []
    if not args.no_vllm:
        t = time.perf_counter()
        log_path = Path(args.log_dir) / f"vllm-{preset}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        res["vllm_log"] = str(log_path)
        client = VllmClient(args.vllm_python, model_dir, args.core, args, log_path)
        res["vllm_startup_s"] = time.perf_counter() - t
        if "error" in client.hello:
            res["vllm_error"] = client.hello["error"]
            print(f"  vLLM: not run: {client.hello['error']}", flush=True)
            client.close()
        else:
            res["vllm_version"] = client.hello.get("version")
            runners.append(VllmRunner(client))
    pd = PdserveRunner(model_dir, args)
    runners.insert(0, pd)
    if not args.no_hf:
        hf = HfRunner(model_dir, args)
        res["transformers_version"] = hf.version
        runners.insert(1, hf)

    # Warm-up: first calls of each shape are slow (oneDNN primitives, torch.compile, allocator).
    warm = make_prompts(min(2, args.batch), args.input_len, seed=10_000)
    for r in runners:
        t = time.perf_counter()
        r.run(warm, min(4, args.decode_steps))
        print(f"  warm-up {r.name}: {time.perf_counter() - t:.1f} s", flush=True)

    rounds: dict[str, list[dict]] = {r.name: [] for r in runners}
    order = list(runners)
    for k in range(args.repeats):
        prompts = make_prompts(args.batch, args.input_len, seed=k)
        for r in order:
            out = r.run(prompts, args.decode_steps)
            rounds[r.name].append(out)
            rt = rates(out)
            print(
                f"  round {k + 1} {r.name:<12} prefill {rt['prefill_tok_s_cpu']:9.1f} tok/s cpu "
                f"({rt['prefill_tok_s_wall']:9.1f} wall)  decode {rt['decode_tok_s_cpu']:8.1f} tok/s cpu "
                f"({rt['decode_tok_s_wall']:8.1f} wall)",
                flush=True,
            )
        order = order[1:] + order[:1]
    res["rounds"] = rounds
    res["summary"] = {name: summarize(rs) for name, rs in rounds.items()}
    if "vllm" in rounds:
        res["summary"]["vllm (two-point)"] = summarize([r["two_point"] for r in rounds["vllm"]])

    ratios: dict = {}
    others = {name: rounds[name] for name in ("transformers", "vllm") if name in rounds}
    if "vllm" in rounds:
        others["vllm (two-point)"] = [r["two_point"] for r in rounds["vllm"]]
    for other, their in others.items():
        rr: dict = {}
        for phase in ("prefill", "decode"):
            for clock in ("cpu", "wall"):
                key = f"{phase}_tok_s_{clock}"
                per = [rates(a)[key] / rates(b)[key] for a, b in zip(rounds["pdserve"], their, strict=True)]
                rr[f"{phase}_{clock}"] = median(per)
                rr[f"{phase}_{clock}_rounds"] = per
        ratios[f"pdserve/{other}"] = rr
    res["ratios"] = ratios
    if "pdserve/vllm" in ratios:
        v, v2 = ratios["pdserve/vllm"], ratios["pdserve/vllm (two-point)"]
        res["target_vs_vllm"] = {
            "prefill_met": v["prefill_cpu"] >= 1.0,
            "decode_met": v["decode_cpu"] >= 1.0,
            "two_point_prefill_met": v2["prefill_cpu"] >= 1.0,
            "two_point_decode_met": v2["decode_cpu"] >= 1.0,
        }

    if args.hw_checks and preset == "qwen3-cpu-bench":
        res["hardware_checks"] = hardware_checks(pd, rounds["pdserve"], rounds.get("vllm"), cfg, model_dir, roof, args)
    if args.profile and preset == "qwen3-cpu-bench":
        res["profile"] = profile_pdserve(pd, 16, 1000, 8, seed=20_000, workload=(args.batch, args.input_len))
        print_profile(res["profile"])
    for r in runners:
        r.close()
    return res


def hardware_checks(
    pd: PdserveRunner, rounds: list[dict], vllm_rounds: list[dict] | None, cfg: dict, model_dir: str, roof, args
) -> dict:
    ctx, batch = 1000, 16
    # Decode steps at batch 16 with ~1000-token contexts: reuse the workload's when it is that one.
    if args.batch == batch and args.input_len == ctx:
        per_round = rounds
        source = f"the pdserve rounds above ({args.decode_steps} decode steps each)"
    else:
        per_round = []
        for k in range(args.repeats):
            per_round.append(pd.run(make_prompts(batch, ctx, seed=30_000 + k), 16))
        source = "dedicated runs (16 decode steps each)"
    step = {clock: median([median(r[f"step_{clock}"]) for r in per_round]) for clock in ("cpu", "wall")}
    ctx_lo = ctx + 1
    ctx_hi = ctx + per_round[0]["decode_steps"]
    prefill = [pd.prefill_only(p) for p in make_prompts(args.repeats, ctx, seed=40_000)]
    pre = {clock: median([p[clock] for p in prefill]) for clock in ("cpu", "wall")}
    wbytes = weight_bytes(model_dir)
    kv = kv_bytes_per_token(cfg) * batch * (ctx_lo + ctx_hi) // 2
    bw = roof.read_gbs * 1e9
    t_weights = wbytes / bw
    t_weights_kv = (wbytes + kv) / bw
    flops = prefill_flops(cfg, ctx)
    gemm = roof.gemm_bf16_gflops * 1e9
    t_gemm = flops["total"] / gemm
    t_gemm_shapes = flops["total"] / (roof.prefill_shapes_gflops * 1e9) if roof.prefill_shapes_gflops else None
    # For reference: vLLM's decode step in this run (same workload), and the step's linears alone.
    vllm_step = None
    if vllm_rounds and args.batch == batch and args.input_len == ctx:
        vllm_step = {
            clock: median([r["decode"][clock] / r["decode_steps"] for r in vllm_rounds]) for clock in ("cpu", "wall")
        }
    # The step's linear FLOPs at the best rate these shapes reach (large M): a floor no bf16 engine
    # gets under on this core, whatever its memory traffic.
    peak = roof.prefill_shapes_gflops or roof.gemm_bf16_gflops
    t_compute = 2 * prefill_flops(cfg, 1)["linear_params"] * batch / (peak * 1e9)
    out = {
        "decode_step_source": source,
        "decode_compute_floor_s": t_compute,
        "decode_compute_floor_gflops": peak,
        "decode_compute_floor_over_weight_bound": t_compute / (wbytes / bw),
        "vllm_decode_step_s": vllm_step,
        "vllm_decode_over_weight_bound": vllm_step["cpu"] / (wbytes / bw) if vllm_step else None,
        "decode_linears_s": roof.decode_linears_s,
        "decode_linears_gflops": roof.decode_linears_gflops,
        "decode_linears_over_weight_bound": roof.decode_linears_s / (wbytes / bw) if roof.decode_linears_s else None,
        "decode_step_s": step,
        "decode_contexts": [ctx_lo, ctx_hi],
        "decode_batch": batch,
        "weight_bytes": wbytes,
        "kv_bytes_read_per_step": kv,
        "read_gbs": roof.read_gbs,
        "decode_bound_weights_s": t_weights,
        "decode_bound_weights_kv_s": t_weights_kv,
        "decode_over_weight_bound": step["cpu"] / t_weights,
        "decode_over_weight_bound_wall": step["wall"] / t_weights,
        "decode_over_weight_kv_bound": step["cpu"] / t_weights_kv,
        "decode_target_max": DECODE_VS_BW_MAX,
        "decode_met": step["cpu"] / t_weights <= DECODE_VS_BW_MAX,
        "prefill_tokens": ctx,
        "prefill_s": pre,
        "prefill_runs": prefill,
        "prefill_flops": flops,
        "gemm_gflops": roof.gemm_bf16_gflops,
        "prefill_bound_s": t_gemm,
        "prefill_achieved_gflops": flops["total"] / pre["cpu"] / 1e9,
        "prefill_fraction_of_gemm": t_gemm / pre["cpu"],
        "prefill_fraction_of_gemm_wall": t_gemm / pre["wall"],
        "prefill_fraction_of_model_shape_gemm": (t_gemm_shapes / pre["cpu"]) if t_gemm_shapes else None,
        "prefill_target_min": PREFILL_VS_GEMM_MIN,
        "prefill_met": t_gemm / pre["cpu"] >= PREFILL_VS_GEMM_MIN,
        "prefill_over_decode_step": pre["cpu"] / step["cpu"],
        "prefill_over_decode_step_wall": pre["wall"] / step["wall"],
        "prefill_over_decode_target_min": PREFILL_OVER_DECODE_MIN,
        "prefill_over_decode_met": pre["cpu"] / step["cpu"] >= PREFILL_OVER_DECODE_MIN,
    }
    print(
        f"  decode step b{batch} ctx {ctx_lo}-{ctx_hi}: {step['cpu'] * 1e3:.2f} ms cpu ({step['wall'] * 1e3:.2f} wall)"
        f"; weights/BW {t_weights * 1e3:.2f} ms -> {out['decode_over_weight_bound']:.2f}x "
        f"(target <= {DECODE_VS_BW_MAX}); (weights+KV)/BW {t_weights_kv * 1e3:.2f} ms",
        flush=True,
    )
    if roof.decode_linears_s:
        print(
            f"    for reference: the step's linears alone (roofline, M={batch}) {roof.decode_linears_s * 1e3:.2f} ms = "
            f"{out['decode_linears_over_weight_bound']:.2f}x the weight bound"
            + (
                f"; vLLM's decode step {vllm_step['cpu'] * 1e3:.2f} ms = {out['vllm_decode_over_weight_bound']:.2f}x"
                if vllm_step
                else ""
            ),
            flush=True,
        )
    print(
        f"  prefill {ctx} tokens: {pre['cpu'] * 1e3:.1f} ms cpu ({pre['wall'] * 1e3:.1f} wall); "
        f"{flops['total'] / 1e9:.1f} GFLOP at {roof.gemm_bf16_gflops:.0f} GFLOP/s = {t_gemm * 1e3:.1f} ms -> "
        f"{out['prefill_fraction_of_gemm'] * 100:.0f}% (target >= {PREFILL_VS_GEMM_MIN * 100:.0f}%); "
        f"prefill/decode step {out['prefill_over_decode_step']:.1f}x (target >= {PREFILL_OVER_DECODE_MIN:.0f}x)",
        flush=True,
    )
    return out


def lscpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_isa() -> str:
    """The bf16-relevant ISA extensions of this CPU, from /proc/cpuinfo."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    want = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return ", ".join(f"{f}: {'yes' if f in flags else 'no'}" for f in want)


def yes(b: bool) -> str:
    return "**met**" if b else "**missed**"


def markdown(result: dict) -> str:
    a = result["args"]
    roof = result["roofline"]
    lines = [
        "## Offline throughput on one core: pdserve vs transformers vs vLLM CPU",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu_model']} (`lscpu`), {result['machine']['nproc']} cores "
        f"({result['machine'].get('isa')}), shared with other jobs; everything pinned to core {a['core']}, one "
        "thread.  ",
        f"Date: {result['date']}; torch {result['versions']['torch']}, transformers "
        f"{result['versions'].get('transformers')}, vLLM {result['versions'].get('vllm')}.  ",
        f"Workload: {a['batch']} prompts x {a['input_len']} random tokens, {a['decode_steps']} decode steps "
        f"(+1 token from prefill), greedy, EOS ignored; max_num_batched_tokens={a['max_num_batched_tokens']}; "
        f"{a['repeats']} rounds, engine order rotated per round, medians (ratios: median of per-round ratios).",
        "Clock: CPU time of the measured process (the machine is shared; CPU time leaves out time spent off "
        "the core); wall-clock figures in parentheses.",
        "",
        "Single-core limits (benchmarks/roofline.py, same run): read "
        f"{roof['read_gbs']:.1f} GB/s ({roof['read_method']}; torch bf16 sum {roof['read_gbs_torch_bf16']:.1f}, "
        f"numpy f32 sum {roof['read_gbs_numpy_f32']:.1f}), copy {roof['copy_gbs']:.1f} GB/s (read+write), "
        f"bf16 GEMM {roof['gemm_bf16_gflops']:.0f} GFLOP/s ({'x'.join(map(str, roof['gemm_shape']))}), "
        f"qwen3-cpu-bench prefill linears (T={a.get('roof_tokens', 1000)}) "
        f"{roof['prefill_shapes_gflops']:.0f} GFLOP/s.",
        "",
        "| model | engine | prefill tok/s | decode tok/s |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, m in result["models"].items():
        for eng, s in m["summary"].items():
            lines.append(
                f"| {name} | {eng} | {s['prefill_tok_s_cpu']:.0f} ({s['prefill_tok_s_wall']:.0f}) | "
                f"{s['decode_tok_s_cpu']:.1f} ({s['decode_tok_s_wall']:.1f}) |"
            )
        if "vllm_error" in m:
            lines.append(f"| {name} | vllm | not run: {m['vllm_error']} | |")
    lines += ["", "| model | ratio | prefill | decode | target |", "| --- | --- | ---: | ---: | --- |"]
    for name, m in result["models"].items():
        for key, r in m["ratios"].items():
            tgt = ""
            if key == "pdserve/vllm":
                t = m["target_vs_vllm"]
                tgt = f">= 1.0x: prefill {yes(t['prefill_met'])}, decode {yes(t['decode_met'])}"
            elif key == "pdserve/vllm (two-point)":
                t = m["target_vs_vllm"]
                tgt = f"cross-check: prefill {yes(t['two_point_prefill_met'])}, decode {yes(t['two_point_decode_met'])}"
            lines.append(
                f"| {name} | {key} | {r['prefill_cpu']:.2f}x ({r['prefill_wall']:.2f}x) | "
                f"{r['decode_cpu']:.2f}x ({r['decode_wall']:.2f}x) | {tgt} |"
            )
        if "vllm_error" in m:
            lines.append(f"| {name} | pdserve/vllm | n/a | n/a | >= 1.0x: not measurable (vLLM cannot run it) |")
    hw = result["models"].get("qwen3-cpu-bench", {}).get("hardware_checks")
    if hw:
        lin_ms = f"{hw['decode_linears_s'] * 1e3:.2f} ms" if hw.get("decode_linears_s") else "n/a"
        lin_x = f"{hw['decode_linears_over_weight_bound']:.2f}x" if hw.get("decode_linears_s") else ""
        vs = hw.get("vllm_decode_step_s")
        v_ms = f"{vs['cpu'] * 1e3:.2f} ms ({vs['wall'] * 1e3:.2f})" if vs else "n/a"
        v_x = f"{hw['vllm_decode_over_weight_bound']:.2f}x" if vs else ""
        floor = (
            f"| (reference: the step's linear FLOPs at the best GEMM rate, {hw['decode_compute_floor_gflops']:.0f} "
            f"GFLOP/s) | | {hw['decode_compute_floor_s'] * 1e3:.2f} ms | "
            f"{hw['decode_compute_floor_over_weight_bound']:.2f}x | info |"
        )
        lines += [
            "",
            "Hardware-limit checks (qwen3-cpu-bench, pdserve, one core):",
            "",
            "| check | measured | limit | ratio | target |",
            "| --- | ---: | ---: | ---: | --- |",
            f"| decode step, batch {hw['decode_batch']}, contexts {hw['decode_contexts'][0]}-"
            f"{hw['decode_contexts'][1]} | {hw['decode_step_s']['cpu'] * 1e3:.2f} ms "
            f"({hw['decode_step_s']['wall'] * 1e3:.2f}) | weights {hw['weight_bytes'] / 1e6:.0f} MB / "
            f"{hw['read_gbs']:.1f} GB/s = {hw['decode_bound_weights_s'] * 1e3:.2f} ms | "
            f"{hw['decode_over_weight_bound']:.2f}x ({hw['decode_over_weight_bound_wall']:.2f}x) | "
            f"<= {hw['decode_target_max']}x {yes(hw['decode_met'])} |",
            f"| (same step vs weights + KV read) | | (weights + {hw['kv_bytes_read_per_step'] / 1e6:.0f} MB KV) / BW "
            f"= {hw['decode_bound_weights_kv_s'] * 1e3:.2f} ms | {hw['decode_over_weight_kv_bound']:.2f}x | info |",
            f"| (reference: the step's linears alone, M={hw['decode_batch']}, oneDNN packed) | {lin_ms} | | "
            f"{lin_x} | info |",
            f"| (reference: vLLM's decode step, same workload) | {v_ms} | | {v_x} | info |",
            floor,
            f"| prefill, {hw['prefill_tokens']} tokens | {hw['prefill_s']['cpu'] * 1e3:.1f} ms "
            f"({hw['prefill_s']['wall'] * 1e3:.1f}) | {hw['prefill_flops']['total'] / 1e9:.1f} GFLOP / "
            f"{hw['gemm_gflops']:.0f} GFLOP/s = {hw['prefill_bound_s'] * 1e3:.1f} ms | "
            f"{hw['prefill_fraction_of_gemm'] * 100:.0f}% of GEMM rate "
            f"({hw['prefill_fraction_of_gemm_wall'] * 100:.0f}%)"
            f" | >= {hw['prefill_target_min'] * 100:.0f}% {yes(hw['prefill_met'])} |",
            f"| prefill(1000) / decode step(b16) | {hw['prefill_over_decode_step']:.1f}x "
            f"({hw['prefill_over_decode_step_wall']:.1f}x) | | | >= {hw['prefill_over_decode_target_min']:.0f}x "
            f"{yes(hw['prefill_over_decode_met'])} |",
        ]
    prof = result["models"].get("qwen3-cpu-bench", {}).get("profile")
    if prof:
        pre = {r["component"]: r["exclusive_ms_per_step"] for r in prof["prefill_components"]}
        dec = {r["component"]: r["exclusive_ms_per_step"] for r in prof["decode_components"]}
        wl = {r["component"]: r["exclusive_ms_per_step"] for r in prof.get("workload_prefill_components", [])}
        w = prof.get("workload_prefill")
        wl_head = f" workload prefill, {w['batch']} x {w['len']} ({w['cpu'] * 1e3:.0f} ms) |" if w else ""
        names = sorted(set(pre) | set(dec), key=lambda n: -(dec.get(n, 0.0) + pre.get(n, 0.0) / 25))
        lines += [
            "",
            "pdserve CPU time by component (`--profile`: functions wrapped with CPU-time timers; exclusive ms per "
            "step; qwen3-cpu-bench):",
            "",
            f"| component | prefill, 1 x 1000 tokens ({prof['prefill_step']['cpu'] * 1e3:.0f} ms) | decode step, "
            f"16 x ~1000 context ({prof['decode_step']['cpu'] * 1e3:.1f} ms) |{wl_head}",
            "| --- | ---: | ---: |" + (" ---: |" if w else ""),
        ]
        for n in names:
            if pre.get(n, 0.0) >= 0.5 or dec.get(n, 0.0) >= 0.1:
                extra = f" {wl.get(n, 0.0):.0f} |" if w else ""
                lines.append(f"| {n} | {pre.get(n, 0.0):.1f} | {dec.get(n, 0.0):.2f} |{extra}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-worker", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=["qwen3-cpu-bench", "qwen3-tiny"])
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB, an integer)")
    p.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "pdserve-offline-bench"))
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-hw-checks", dest="hw_checks", action="store_false")
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of pdserve's steps")
    p.add_argument("--quick", action="store_true", help="shorter workload (256-token prompts, 16 decode steps)")
    p.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/offline_<date>.json)")
    p.add_argument("--md", default=str(MD_PATH), help="Markdown section path ('' to skip)")
    args = p.parse_args()

    if args.vllm_worker:
        vllm_worker(args.vllm_worker, args.max_num_seqs or 16, args.max_num_batched_tokens, args.max_model_len)
        return
    if args.quick:
        args.input_len, args.decode_steps = 256, 16

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import roofline
    import torch

    t_start = time.perf_counter()
    roofline.pin_to_core(args.core)
    model_shapes = roofline.model_prefill_shapes(2048, 6144, 16 * 128, 2 * 128)  # qwen3-cpu-bench
    print(f"roofline on core {args.core} ...", flush=True)
    roof = roofline.measure(args.core, 5, 1.0, (2048, 2048, 6144), 1000, model_shapes, decode_rows=16, decode_layers=4)
    print(
        f"  read {roof.read_gbs:.1f} GB/s ({roof.read_method}), copy {roof.copy_gbs:.1f} GB/s, "
        f"bf16 GEMM {roof.gemm_bf16_gflops:.0f} GFLOP/s, model prefill linears {roof.prefill_shapes_gflops:.0f}",
        flush=True,
    )
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    result: dict = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/offline_throughput.py", *sys.argv[1:]]),
        "machine": {"cpu_model": lscpu_model(), "nproc": os.cpu_count(), "isa": cpu_isa()},
        "versions": {"torch": torch.__version__},
        "args": vars(args) | {"roof_tokens": 1000},
        "roofline": roofline.asdict(roof),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="pdserve-offline-") as tmp:
        for preset in args.models:
            m = bench_model(preset, args, roof, Path(tmp))
            result["models"][preset] = m
            if m.get("transformers_version"):
                result["versions"]["transformers"] = m["transformers_version"]
            if m.get("vllm_version"):
                result["versions"]["vllm"] = m["vllm_version"]
            for key, r in m["ratios"].items():
                print(
                    f"  {key}: prefill {r['prefill_cpu']:.2f}x cpu ({r['prefill_wall']:.2f}x wall), "
                    f"decode {r['decode_cpu']:.2f}x cpu ({r['decode_wall']:.2f}x wall)",
                    flush=True,
                )
    result["elapsed_s"] = time.perf_counter() - t_start
    out = Path(args.out) if args.out else RESULTS_DIR / f"offline_{date}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out} ({result['elapsed_s']:.0f} s)")
    if args.md:
        Path(args.md).write_text(markdown(result))
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
