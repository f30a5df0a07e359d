"""Random prompts of exact length and Poisson / gamma arrivals."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from pdserve.bench.workload import WorkloadConfig, arrival_offsets, length_bounds, make_requests


def test_exact_lengths_without_range_ratio() -> None:
    reqs = make_requests(WorkloadConfig(num_prompts=20, input_len=37, output_len=5))
    assert [r.index for r in reqs] == list(range(20))
    assert all(r.prompt_len == 37 and len(r.prompt_token_ids) == 37 and r.output_len == 5 for r in reqs)


def test_range_ratio_bounds_like_vllm() -> None:
    assert length_bounds(100, 0.5) == (50, 150)
    assert length_bounds(10, 0.25) == (7, 13)  # floor(7.5), ceil(12.5)
    assert length_bounds(1, 0.9) == (1, 2)  # never below 1
    reqs = make_requests(WorkloadConfig(num_prompts=2000, input_len=100, output_len=10, range_ratio=0.5, seed=3))
    ins = [r.prompt_len for r in reqs]
    outs = [r.output_len for r in reqs]
    assert min(ins) >= 50 and max(ins) <= 150 and min(outs) >= 5 and max(outs) <= 15
    assert min(ins) <= 52 and max(ins) >= 148  # the whole range is used
    assert abs(np.mean(ins) - 100) < 3


def test_token_ids_in_vocab_range_and_never_excluded() -> None:
    cfg = WorkloadConfig(
        num_prompts=50,
        input_len=64,
        output_len=1,
        vocab_range=(10, 20),
        exclude_token_ids=frozenset({12, 13}),
    )
    ids = {t for r in make_requests(cfg) for t in r.prompt_token_ids}
    assert ids == set(range(10, 20)) - {12, 13}
    default = {t for r in make_requests(WorkloadConfig(num_prompts=20, input_len=256)) for t in r.prompt_token_ids}
    assert min(default) >= 0 and max(default) < 256 and all(isinstance(t, int) for t in default)


def test_seeded_and_reproducible() -> None:
    a = make_requests(WorkloadConfig(num_prompts=5, input_len=16, seed=1))
    assert a == make_requests(WorkloadConfig(num_prompts=5, input_len=16, seed=1))
    assert a != make_requests(WorkloadConfig(num_prompts=5, input_len=16, seed=2))
    assert a != make_requests(WorkloadConfig(num_prompts=5, input_len=16, seed=1), stream=1)  # warm-ups


def test_random_prefix_is_shared_by_every_prompt_of_a_seed() -> None:
    cfg = WorkloadConfig(num_prompts=6, input_len=10, prefix_len=32, seed=4)
    main, warm = make_requests(cfg), make_requests(cfg, stream=1)
    prefix = main[0].prompt_token_ids[:32]
    assert all(r.prompt_len == 42 and r.prompt_token_ids[:32] == prefix for r in main + warm)
    assert len({r.prompt_token_ids[32:] for r in main + warm}) == 12  # the rest differs
    other = make_requests(WorkloadConfig(num_prompts=1, input_len=10, prefix_len=32, seed=5))
    assert other[0].prompt_token_ids[:32] != prefix
    plain = make_requests(WorkloadConfig(num_prompts=6, input_len=10, seed=4))
    assert [r.prompt_token_ids for r in plain] == [r.prompt_token_ids[32:] for r in main]


def test_several_prefixes_are_drawn_per_request() -> None:
    cfg = WorkloadConfig(num_prompts=200, input_len=8, prefix_len=16, num_prefixes=4, seed=1)
    reqs = make_requests(cfg)
    counts = Counter(r.prompt_token_ids[:16] for r in reqs)
    assert len(counts) == 4 and min(counts.values()) > 25  # uniform-ish over the 4
    warm = make_requests(cfg, stream=1)
    assert {r.prompt_token_ids[:16] for r in warm} <= set(counts)  # the same set in every stream


def test_lora_modules_are_drawn_per_request_without_changing_prompts() -> None:
    plain = make_requests(WorkloadConfig(num_prompts=200, input_len=8, seed=3))
    reqs = make_requests(WorkloadConfig(num_prompts=200, input_len=8, seed=3, lora_modules=("a", "b", "c")))
    assert [r.prompt_token_ids for r in reqs] == [r.prompt_token_ids for r in plain]
    counts = Counter(r.model for r in reqs)
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 40
    assert {r.model for r in plain} == {None}
    again = make_requests(WorkloadConfig(num_prompts=200, input_len=8, seed=3, lora_modules=("a", "b", "c")))
    assert [r.model for r in again] == [r.model for r in reqs]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_len": 0},
        {"output_len": 0},
        {"range_ratio": 1.0},
        {"range_ratio": -0.1},
        {"vocab_range": (5, 5)},
        {"vocab_range": (0, 2), "exclude_token_ids": frozenset({0, 1})},
        {"num_prompts": -1},
        {"prefix_len": -1},
        {"num_prefixes": 0},
    ],
)
def test_workload_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        WorkloadConfig(**kwargs)  # type: ignore[arg-type]


def test_infinite_rate_sends_all_at_once() -> None:
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    assert arrival_offsets(0, 2.0) == []


@pytest.mark.parametrize(("rate", "burstiness"), [(4.0, 1.0), (10.0, 0.5), (2.0, 4.0)])
def test_mean_inter_arrival_is_one_over_rate(rate: float, burstiness: float) -> None:
    n = 4000
    t = np.asarray(arrival_offsets(n, rate, burstiness, seed=0))
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    # gamma(shape=k): coefficient of variation 1/sqrt(k) -- 1 for Poisson, larger when bursty
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.15)


def test_poisson_gaps_are_exponential() -> None:
    gaps = np.diff(np.concatenate([[0.0], arrival_offsets(5000, 5.0, 1.0, seed=7)]))
    # exponential: P(gap > mean) = e^-1
    assert np.mean(gaps > gaps.mean()) == pytest.approx(math.exp(-1), abs=0.03)


def test_infinite_burstiness_is_uniform_spacing() -> None:
    assert arrival_offsets(4, 2.0, math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_arrivals_seeded() -> None:
    assert arrival_offsets(10, 3.0, seed=1) == arrival_offsets(10, 3.0, seed=1)
    assert arrival_offsets(10, 3.0, seed=1) != arrival_offsets(10, 3.0, seed=2)


@pytest.mark.parametrize(("rate", "burstiness"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (math.nan, 1.0)])
def test_arrival_validation(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError):
        arrival_offsets(3, rate, burstiness)
