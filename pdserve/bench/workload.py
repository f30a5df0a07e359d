"""Synthetic workload: random token-id prompts of exact length, and request arrival times.

Follows vLLM's `random` dataset and `get_request` arrival process so numbers are comparable:
lengths are uniform integers in [floor(len*(1-r)), ceil(len*(1+r))]; inter-arrival gaps are
gamma(shape=burstiness, scale=1/(rate*burstiness)) (burstiness 1 = Poisson), rescaled so the
last request arrives at num_prompts/rate. `prefix_len` (vLLM's `--random-prefix-len`) puts a
random prefix before each prompt, one of `num_prefixes` drawn per request (the same set for every
stream of a seed): shared system prompts, what a prefix cache (and cache-aware routing) is for.

`WorkloadConfig` also says which prompts a run sends instead (`dataset_name` "sharegpt" or "custom",
a file: datasets.py reads it, prompts.py samples and tokenizes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pdserve.bench.datasets import DATASET_NAMES, DatasetName

DEFAULT_VOCAB_RANGE = (0, 256)
PREFIX_STREAM = 1 << 20  # the rng stream of the shared prefix, apart from every prompt stream
LORA_STREAM = PREFIX_STREAM + 1  # the adapter draws: prompts stay what they were without them
LoraAssignment = Literal["random", "round-robin"]
RampUpStrategy = Literal["linear", "exponential"]


@dataclass(frozen=True)
class RampUp:
    """vLLM's --ramp-up-strategy: the request rate goes from `start_rps` (first request) to `end_rps`
    (last request), linearly or geometrically in the request index, instead of one fixed rate."""

    strategy: RampUpStrategy
    start_rps: float
    end_rps: float

    def __post_init__(self) -> None:
        if self.strategy not in ("linear", "exponential"):
            raise ValueError(f"ramp-up strategy must be linear or exponential, got {self.strategy!r}")
        if not 0 < self.start_rps <= self.end_rps or math.isinf(self.end_rps):
            raise ValueError(f"ramp-up needs 0 < start_rps <= end_rps < inf, got {self.start_rps}, {self.end_rps}")

    def rates(self, n: int) -> list[float]:
        """The rate (req/s) each of `n` requests is sent at."""
        progress = np.arange(n) / max(n - 1, 1)
        if self.strategy == "linear":
            rates = self.start_rps + (self.end_rps - self.start_rps) * progress
        else:
            rates = self.start_rps * (self.end_rps / self.start_rps) ** progress
        return [float(r) for r in rates]


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
    lora_assignment: LoraAssignment = "random"  # or "round-robin": request i names lora_modules[i % len]
    output_range_ratio: float | None = None  # the output lengths' own range ratio; None: range_ratio's
    # Prompts from a file instead of random ids (vLLM's --dataset-name / --dataset-path).
    dataset_name: DatasetName = "random"
    dataset_path: str | None = None
    sharegpt_output_len: int | None = None  # None: each ShareGPT reply's own token count
    custom_output_len: int = 256  # every request of a custom file (vLLM's default)
    skip_chat_template: bool = False  # custom + completions: send the bare prompt, not its chat rendering
    disable_shuffle: bool = False  # a file's entries in file order instead of shuffled by the seed
    ignore_eos: bool = False  # datasets: ask for exactly the output length (random prompts always do)

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
        if self.output_range_ratio is not None and not 0.0 <= self.output_range_ratio < 1.0:
            raise ValueError(f"output_range_ratio must be in [0, 1), got {self.output_range_ratio}")
        if self.lora_assignment not in ("random", "round-robin"):
            raise ValueError(f"lora_assignment must be random or round-robin, got {self.lora_assignment!r}")
        lo, hi = self.vocab_range
        if not 0 <= lo < hi:
            raise ValueError(f"vocab_range must satisfy 0 <= lo < hi, got {self.vocab_range}")
        if not set(range(lo, hi)) - self.exclude_token_ids:
            raise ValueError("exclude_token_ids leaves no token id in vocab_range")
        if self.dataset_name not in DATASET_NAMES:
            raise ValueError(f"dataset_name must be one of {DATASET_NAMES}, got {self.dataset_name!r}")
        if (self.dataset_name == "random") != (self.dataset_path is None):
            raise ValueError("dataset_path is required by a sharegpt or custom dataset, and refused by random")
        if (self.sharegpt_output_len is not None and self.sharegpt_output_len < 1) or self.custom_output_len < 1:
            raise ValueError("sharegpt_output_len and custom_output_len must be >= 1")

    @property
    def is_random(self) -> bool:
        return self.dataset_name == "random"

    @property
    def out_range_ratio(self) -> float:
        """The range ratio of the output lengths (vLLM's --random-range-ratio '{"output": r}')."""
        return self.range_ratio if self.output_range_ratio is None else self.output_range_ratio

    @property
    def fixed_output_len(self) -> int | None:
        """The output length every request asks for; None when a ShareGPT reply sets each one."""
        if self.dataset_name == "sharegpt":
            return self.sharegpt_output_len
        return self.custom_output_len if self.dataset_name == "custom" else self.output_len

    def describe(self) -> str:
        """One phrase for reports, e.g. "512 input / 64 output tokens" or "ShareGPT file x.json"."""
        if self.is_random:
            prefix = ""
            if self.prefix_len:
                which = "one shared" if self.num_prefixes == 1 else f"one of {self.num_prefixes} shared"
                prefix = f"{which} {self.prefix_len}-token prefix + "
            return f"{prefix}{self.input_len} input / {self.output_len} output tokens"
        kind = "ShareGPT" if self.dataset_name == "sharegpt" else "custom"
        out = self.fixed_output_len
        return f"{kind} file {self.dataset_path}, " + (f"{out} output tokens" if out else "the replies' output lengths")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_token_ids: tuple[int, ...]
    output_len: int
    model: str | None = None  # a LoRA adapter to name instead of the benchmark's model
    # Sent instead of the ids when set (a dataset's prompt; random ids as text for a chat endpoint);
    # prompt_token_ids are then its tokens as counted by the benchmark's tokenizer.
    prompt_text: str | None = None
    ignore_eos: bool = True  # ask for exactly output_len tokens (ignore_eos, min_tokens)

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
    out_lo, out_hi = length_bounds(cfg.output_len, cfg.out_range_ratio)
    input_lens = rng.integers(in_lo, in_hi + 1, size=cfg.num_prompts)
    output_lens = rng.integers(out_lo, out_hi + 1, size=cfg.num_prompts)
    allowed = allowed_token_ids(cfg)
    prefix_rng = np.random.default_rng([cfg.seed, PREFIX_STREAM])
    prefixes = [tuple(int(t) for t in prefix_rng.choice(allowed, cfg.prefix_len)) for _ in range(cfg.num_prefixes)]
    # Its own stream, so prompts of a seed stay what they were before prefixes existed.
    which = np.random.default_rng([cfg.seed, stream, PREFIX_STREAM]).integers(0, cfg.num_prefixes, cfg.num_prompts)
    return [
        BenchRequest(
            index=i,
            prompt_token_ids=prefixes[k] + tuple(int(t) for t in rng.choice(allowed, size=int(n_in))),
            output_len=int(n_out),
            model=adapter,
        )
        for i, (n_in, n_out, k, adapter) in enumerate(
            zip(input_lens, output_lens, which, draw_adapters(cfg, stream, cfg.num_prompts), strict=True))
    ]


def allowed_token_ids(cfg: WorkloadConfig) -> np.ndarray:
    """The ids random prompts are drawn from: --vocab-range less --exclude-token-ids."""
    lo, hi = cfg.vocab_range
    return np.array([t for t in range(lo, hi) if t not in cfg.exclude_token_ids], dtype=np.int64)


def draw_adapters(cfg: WorkloadConfig, stream: int, n: int) -> list[str | None]:
    """The LoRA adapter each of `n` requests names (None: the benchmark's model), drawn uniformly
    from its own rng stream so that the prompts of a seed do not depend on it (or in turn, with
    lora_assignment round-robin)."""
    if not cfg.lora_modules:
        return [None] * n
    if cfg.lora_assignment == "round-robin":
        return [cfg.lora_modules[i % len(cfg.lora_modules)] for i in range(n)]
    picks = np.random.default_rng([cfg.seed, stream, LORA_STREAM]).integers(0, len(cfg.lora_modules), n)
    return [cfg.lora_modules[int(a)] for a in picks]


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0,
                    ramp_up: RampUp | None = None) -> list[float]:
    """Send time of each of `n` requests, in seconds after the benchmark start (non-decreasing).
    With `ramp_up`, request i's gap follows its own rate (RampUp.rates) and `request_rate` is unused."""
    if ramp_up is not None:
        return _ramp_offsets(n, ramp_up, burstiness, seed)
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


def _ramp_offsets(n: int, ramp_up: RampUp, burstiness: float, seed: int) -> list[float]:
    """vLLM's ramp-up arrivals: gamma gaps at each request's rate, not rescaled to a total span."""
    if burstiness <= 0 or math.isnan(burstiness):
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rates = np.asarray(ramp_up.rates(n))
    if math.isinf(burstiness):
        gaps = 1.0 / rates
    else:
        gaps = np.random.default_rng([seed, 2]).gamma(shape=burstiness, scale=1.0 / (rates * burstiness))
    return [float(t) for t in np.cumsum(gaps)]
