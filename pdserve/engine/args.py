"""Engine flags shared by `serve`, `generate` and `demo`; turned into one frozen EngineConfig."""

from __future__ import annotations

import argparse
import json

from pdserve.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_KV_CACHE_GIB,
    DEFAULT_MAX_LORA_RANK,
    DEFAULT_MAX_LORAS,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    KV_CACHE_DTYPES,
    CacheConfig,
    EngineConfig,
    KVTransferConfig,
    LoRAConfig,
    LoRAModule,
    SchedulerConfig,
    SpeculativeConfig,
)
from pdserve.engine.sampling_params import SamplingDefaults


def _bounded_int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    return _bounded_int(text, 1, "positive")


def non_negative_int(text: str) -> int:
    return _bounded_int(text, 0, "non-negative")


def port_number(text: str) -> int:
    """A TCP port, 0 (pick a free one) to 65535; uvicorn would otherwise bind 70000 as 70000 - 65536."""
    value = _bounded_int(text, 0, "port (0-65535)")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port (0-65535) integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6)."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a core list like '0-3,6', got {text!r}") from None
    return tuple(cpus)


def _json_object(text: str) -> dict:
    """A flag's JSON object value; ArgumentTypeError (argparse names the flag) otherwise."""
    try:
        values = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(values, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return values


def generation_overrides(text: str) -> SamplingDefaults:
    """'{"temperature": 0.5, "max_new_tokens": 128}' -> SamplingDefaults."""
    try:
        return SamplingDefaults.from_generation_config(_json_object(text))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def lora_module(text: str) -> LoRAModule:
    """'name=path' or '{"name": ..., "path": ...}' (vLLM's two forms) -> LoRAModule."""
    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
            return LoRAModule(str(d["name"]), str(d["path"]))
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f'expected {{"name": ..., "path": ...}}, got {text!r}') from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return LoRAModule(name, path)


def speculative_config(text: str) -> SpeculativeConfig:
    """vLLM's --speculative-config JSON, '{"method": "ngram", "num_speculative_tokens": 4, ...}'."""
    try:
        return SpeculativeConfig.from_dict(_json_object(text))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_args(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("model", help="a local Hugging Face directory or dummy:<preset>")
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    g.add_argument("--cpus", type=cpu_list, default=None, help="pin to these cores, e.g. 0-3")
    g.add_argument("--block-size", type=positive_int, default=DEFAULT_BLOCK_SIZE)
    g.add_argument("--num-kv-blocks", type=positive_int, default=None)
    g.add_argument("--kv-cache-memory", type=positive_float, default=DEFAULT_KV_CACHE_GIB, help="GiB")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="the KV cache's storage: auto = the model's dtype; fp8 (= fp8_e4m3) or fp8_e5m2 = float8 "
                        "with per-layer scales (the checkpoint's k_scale / v_scale, else 1.0): about twice the "
                        "blocks in --kv-cache-memory; prefill and decode instances must use the same")
    g.add_argument("--max-num-seqs", type=positive_int, default=DEFAULT_MAX_NUM_SEQS)
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS)
    g.add_argument("--max-model-len", type=positive_int, default=None)
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="fcfs: by arrival; priority: by each request's `priority` (lower first, then arrival), "
                        "preempting running requests that rank after a waiting one when the KV cache is full")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of shared prompt prefixes (whole blocks)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: no CUDA graphs (decode-only steps are otherwise replayed from graphs)")
    g.add_argument("--pooling-type", default="last", choices=["last", "mean"],
                   help="embeddings (/v1/embeddings): the last prompt token's final hidden state (Qwen3-Embedding's), "
                        "or the mean over every prompt token (no prefix cache for those requests)")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT directories)")
    g.add_argument("--lora-modules", type=lora_module, nargs="+", default=[], metavar="NAME=PATH",
                   help="adapters to load at start; clients name one in `model` (needs --enable-lora)")
    g.add_argument("--max-loras", type=positive_int, default=DEFAULT_MAX_LORAS,
                   help="adapters on the device at once (loading another evicts an idle one)")
    g.add_argument("--max-lora-rank", type=positive_int, default=DEFAULT_MAX_LORA_RANK)
    g.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                   help="auto: requests default to the sampling values of the model's generation_config.json "
                        "(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens); vllm: ignore them")
    g.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help="n-gram speculative decoding, vLLM's JSON, e.g. '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 1}': "
                        "a decoding request drafts the tokens that followed an earlier occurrence of its last "
                        "n tokens, and one forward pass verifies them")
    g.add_argument("--override-generation-config", type=generation_overrides, default=SamplingDefaults(),
                   metavar="JSON", help='sampling defaults over the model\'s, e.g. \'{"temperature": 0.5}\'')


def engine_config_from_args(
    args: argparse.Namespace, kv_transfer: KVTransferConfig | None = None, shared_kv: bool = False
) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        threads=args.threads,
        cpus=args.cpus,
        enforce_eager=args.enforce_eager,
        generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
        cache=CacheConfig(
            block_size=args.block_size,
            num_kv_blocks=args.num_kv_blocks,
            kv_cache_gib=args.kv_cache_memory,
            cache_dtype=args.kv_cache_dtype,
            shared_memory=shared_kv,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            enable_chunked_prefill=not args.no_chunked_prefill,
            policy=args.scheduling_policy,
        ),
        pooling_type=args.pooling_type,
        kv_transfer=kv_transfer or KVTransferConfig(),
        lora=LoRAConfig(enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                        lora_modules=tuple(args.lora_modules)),
        speculative=args.speculative_config,
    )
