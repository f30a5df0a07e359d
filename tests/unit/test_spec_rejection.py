"""Verification of drafts: the accept/emit rule, and its distribution checked on a tiny vocabulary."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec.rejection import num_accepted, verify

V = 5
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
N = 200_000  # rows per draw: binomial std of a frequency <= 0.0012; the tolerance is 8x that


def test_verify_emits_the_accepted_prefix_then_the_target_token():
    assert verify([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all accepted, then the bonus token
    assert verify([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # the first mismatch ends the row
    assert verify([4, 5, 6], [1, 5, 6, 7]) == [1]
    assert verify([], [3]) == [3]
    assert num_accepted([4, 5], [4, 5, 0]) == 2
    with pytest.raises(ValueError):
        verify([4, 5], [4, 5])


def processed(sp: SamplingParams) -> torch.Tensor:
    """The target distribution, computed here independently of the sampler."""
    logits = LOGITS / sp.temperature
    if sp.top_k > 0:
        logits = logits.masked_fill(logits < logits.topk(sp.top_k).values[-1], float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample_rows(sp: SamplingParams) -> torch.Tensor:
    """N target tokens of one position, each an independent row of the real sampler."""
    req = Request("r", [0], sp)
    sampler = Sampler(torch.device("cpu"), V)
    torch.manual_seed(0)
    return sampler(LOGITS.repeat(N, 1), sampler.prepare([req] * N, [[]] * N))


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3)])
@pytest.mark.parametrize("draft", [0, 2, 4])
def test_speculative_sampling_has_the_target_distribution(sp, draft):
    """A one-hot draft x: accepted with probability p(x); on rejection the emitted token follows p
    with x removed, renormalised; so the emitted token follows p."""
    p = processed(sp)
    target = sample_rows(sp)
    emitted = torch.tensor([verify([draft], [int(t), 0])[0] for t in target[:2000]])
    assert torch.equal(emitted, target[:2000])  # the row emits its target token, accepted or not
    accepted = target == draft
    assert accepted.float().mean().item() == pytest.approx(p[draft].item(), abs=0.01)
    rejected = target[~accepted]
    residual = p.clone()
    residual[draft] = 0.0
    if residual.sum() > 0:
        freq = torch.bincount(rejected, minlength=V).float() / len(rejected)
        assert torch.allclose(freq, residual / residual.sum(), atol=0.01)
    freq = torch.bincount(target, minlength=V).float() / N
    assert torch.allclose(freq, p, atol=0.01)


def test_each_position_is_processed_with_the_drafts_before_it():
    """Penalties count a row's earlier drafts as output; min_tokens bans stop tokens per position."""
    sp = SamplingParams(temperature=0.0, presence_penalty=2.0, min_tokens=2, stop_token_ids=[3])
    req = Request("r", [0], sp)
    sampler = Sampler(torch.device("cpu"), V)
    logits = torch.tensor([[0.0, 3.0, 2.5, 4.0, 0.0]]).repeat(3, 1)
    rows = sampler.prepare([req] * 3, [[], [1], [1, 2]])
    # Row 0: 3 banned (0 tokens so far) -> 1. Row 1: 3 banned (1 so far), 1 penalised -> 2.
    # Row 2: 2 tokens before it, 3 allowed -> 3.
    assert sampler(logits, rows).tolist() == [1, 2, 3]


def test_a_seeded_generator_is_rewound_past_discarded_rows():
    sp = SamplingParams(temperature=1.0, seed=5)
    req = Request("r", [0], sp)
    plain = Sampler(torch.device("cpu"), V)
    expected = [plain(LOGITS[None], plain.prepare([req])).item() for _ in range(4)]
    spec = Sampler(torch.device("cpu"), V)
    rows = spec.prepare([req] * 3, [[], [7], [7, 7]])
    first = spec(LOGITS.repeat(3, 1), rows).tolist()
    assert first == expected[:3]
    spec.rewind(rows, 1)  # keep row 0 only: the next draw is the stream's second
    assert [spec(LOGITS[None], spec.prepare([req])).item() for _ in range(3)] == expected[1:]
