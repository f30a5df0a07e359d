"""`pdserve generate` (offline generation, prints tokens/s) and `pdserve demo` (the main job)."""

from __future__ import annotations

import argparse
import time

from pdserve.config import DEFAULT_MODEL
from pdserve.engine.args import add_engine_args, engine_config_from_args, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="offline generation with the engine; prints tokens/s")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: random token prompts")
    p.add_argument("--num-prompts", type=positive_int, default=8)
    p.add_argument("--input-len", type=positive_int, default=128)
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=run_generate)

    d = sub.add_parser("demo", help="the main job on the embedded default model")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--out", default="runs/demo", help="folder for the report and figures")
    d.set_defaults(func=run_demo)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(engine_config_from_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True)
    if args.prompt:
        prompts: list[str | list[int]] = list(args.prompt)
    else:
        g = torch.Generator().manual_seed(args.seed)
        hi = min(256, engine.model_config.vocab_size)
        prompts = [torch.randint(0, hi, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]
    texts: dict[str, str] = {}
    t0 = time.perf_counter()
    first: float | None = None
    n_out = 0
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    n_in = sum(r.num_prompt_tokens for r in engine.scheduler.requests.values())
    while engine.has_unfinished():
        for out in engine.step():
            if first is None and out.new_token_ids:
                first = time.perf_counter()
            n_out += len(out.new_token_ids)
            texts[out.request_id] = texts.get(out.request_id, "") + out.new_text
    dt = time.perf_counter() - t0
    if args.prompt:
        for i, p in enumerate(prompts):
            print(f"--- prompt {i}: {p!r}\n{texts.get(str(i), '')}")
    print(
        f"model {args.model} ({engine.dtype}, KV cache {engine.kv_dtype}): {len(prompts)} requests, "
        f"{n_in} prompt tokens, "
        f"{n_out} generated tokens in {dt:.2f} s -> {n_out / dt:.1f} output tokens/s, "
        f"{(n_in + n_out) / dt:.1f} total tokens/s; first token after {((first or t0) - t0) * 1000:.0f} ms"
    )
    spec = engine.stats().spec_decode
    if spec is not None:
        print(f"speculative decoding: {spec.num_accepted_tokens} of {spec.num_draft_tokens} draft tokens accepted "
              f"({spec.acceptance_rate:.0%}), {spec.mean_acceptance_length:.2f} tokens per verified row")
    engine.close()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from pdserve import demo

    return demo.run(args.model, args.out)
