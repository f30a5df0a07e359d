"""Synthetic workload: random token-id prompts of exact length, and request arrival times.

Follows vLLM's `random` dataset and `get_request` arrival process so numbers are comparable:
lengths are uniform integers in [floor(len*(1-r)), ceil(len*(1+r))]; inter-arrival gaps are
gamma(shape=burstiness, scale=1/(rate*burstiness)) (burstiness 1 = Poisson), rescaled so the
last request arrives at num_prompts/rate. `prefix_len` (vLLM's `--random-prefix-len`) puts a
random prefix before each prompt, one of `num_prefixes` drawn per request (the same set for every
stream of a seed): shared system prompts, what a prefix cache (and cache-aware routing) is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_VOCAB_RANGE = (0, 256)
PREFIX_STREAM = 1 << 20  # the rng stream of the shared prefix, apart from every prompt stream
LORA_STREAM = PREFIX_STREAM + 1  # the adapter draws: prompts stay what they were without them


@dataclass(frozen=True)
class WorkloadConfig:
    num_prompts: int = 100
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 0  # tokens of a shared random prefix before every prompt (not counted in input_len)
    num_prefixes: int = 1  # distinct prefixes, one drawn uniformly per request
    vocab_range: tuple[int, int] = DEFAULT_VOCAB_RANGE  # token ids drawn from [lo, hi)
    exclude_token_ids: frozenset[int] = frozenset()  # e.g. special ids inside the range
    seed: int = 0
    lora_modules: tuple[str, ...] = ()  # adapter names; each request names one, drawn uniformly (vLLM's)

    def __post_init__(self) -> None:
        if self.num_prompts < 0:
            raise ValueError(f"num_prompts must be >= 0, got {self.num_prompts}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be >= 1")
        if self.prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {self.prefix_len}")
        if self.num_prefixes < 1:
            raise ValueError(f"num_prefixes must be >= 1, got {self.num_prefixes}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        lo, hi = self.vocab_range
        if not 0 <= lo < hi:
            raise ValueError(f"vocab_range must satisfy 0 <= lo < hi, got {self.vocab_range}")
        if not set(range(lo, hi)) - self.exclude_token_ids:
            raise ValueError("exclude_token_ids leaves no token id in vocab_range")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_token_ids: tuple[int, ...]
    output_len: int
    model: str | None = None  # a LoRA adapter to name instead of the benchmark's model

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] for a length of `length` and ratio `range_ratio` (low is at least 1)."""
    low = max(1, math.floor(length * (1 - range_ratio)))
    return low, max(low, math.ceil(length * (1 + range_ratio)))


def make_requests(cfg: WorkloadConfig, stream: int = 0) -> list[BenchRequest]:
    """`cfg.num_prompts` requests; `stream` picks an independent sequence of prompts (warm-ups use
    1; a sweep one per rate), all after the same shared prefix."""
    rng = np.random.default_rng([cfg.seed, stream])
    in_lo, in_hi = length_bounds(cfg.input_len, cfg.range_ratio)
    out_lo, out_hi = length_bounds(cfg.output_len, cfg.range_ratio)
    input_lens = rng.integers(in_lo, in_hi + 1, size=cfg.num_prompts)
    output_lens = rng.integers(out_lo, out_hi + 1, size=cfg.num_prompts)
    lo, hi = cfg.vocab_range
    allowed = np.array([t for t in range(lo, hi) if t not in cfg.exclude_token_ids], dtype=np.int64)
    prefix_rng = np.random.default_rng([cfg.seed, PREFIX_STREAM])
    prefixes = [tuple(int(t) for t in prefix_rng.choice(allowed, cfg.prefix_len)) for _ in range(cfg.num_prefixes)]
    # Its own stream, so prompts of a seed stay what they were before prefixes existed.
    which = np.random.default_rng([cfg.seed, stream, PREFIX_STREAM]).integers(0, cfg.num_prefixes, cfg.num_prompts)
    adapters = np.random.default_rng([cfg.seed, stream, LORA_STREAM]).integers(0, max(len(cfg.lora_modules), 1),
                                                                                 cfg.num_prompts)
    return [
        BenchRequest(
            index=i,
            prompt_token_ids=prefixes[k] + tuple(int(t) for t in rng.choice(allowed, size=int(n_in))),
            output_len=int(n_out),
            model=cfg.lora_modules[a] if cfg.lora_modules else None,
        )
        for i, (n_in, n_out, k, a) in enumerate(zip(input_lens, output_lens, which, adapters, strict=True))
    ]


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send time of each of `n` requests, in seconds after the benchmark start (non-decreasing)."""
    if request_rate <= 0 or math.isnan(request_rate):
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    if burstiness <= 0 or math.isnan(burstiness):
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if n == 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * n
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        rng = np.random.default_rng([seed, 2])
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    offsets *= (n / request_rate) / offsets[-1]  # vLLM: pin the total span to n/rate
    return [float(t) for t in offsets]
