"""`pdserve export MODEL DIR`: write any model (dummy ones included) as a Hugging Face directory."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model as a Hugging Face directory (for transformers, vLLM)")
    p.add_argument("model", help="a local Hugging Face directory or dummy:<preset>")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-size", default="4GB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quantization",
        choices=["fp8", "fp8-dynamic", "gptq", "awq"],
        default=None,
        help="write FP8 weights, as pdserve, vLLM and transformers load them: fp8 = block-wise 128x128 "
        "weight_scale_inv (quant_method fp8, as Qwen3-*-FP8); fp8-dynamic = per-channel weight_scale, "
        "dynamic per-token activations (compressed-tensors, as *-FP8-dynamic); gptq = 4-bit symmetric GPTQ "
        "(v1 format, round-to-nearest), awq = 4-bit AutoAWQ GEMM format (round-to-nearest). lm_head and MoE "
        "routers stay in --dtype, as do embeddings and norms",
    )
    p.add_argument("--group-size", type=int, default=128, help="gptq / awq: input features per scale (-1: per channel)")
    p.add_argument("--act-order", action="store_true", help="gptq: desc_act groups (an act-order g_idx)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pdserve.model.export import export_model

    out = export_model(
        args.model, args.out_dir, args.dtype, args.max_shard_size, seed=args.seed, quantization=args.quantization,
        group_size=args.group_size, act_order=args.act_order,
    )
    print(f"wrote {args.model} to {out}" + (f" ({args.quantization})" if args.quantization else ""))
    return 0
