"""Presence, frequency and repetition penalties: the sampler's arithmetic on chosen logits (their
effect on whole generations: tests/unit/test_sampling.py)."""

from __future__ import annotations

import pytest
import torch

from pdserve import SamplingParams
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler

V = 8


def request(prompt: list[int], output: list[int], **kw) -> Request:
    r = Request("r", prompt, SamplingParams(temperature=0.0, **kw))
    r.output_token_ids = list(output)
    return r


def adjusted(logits: list[float], req: Request) -> list[float]:
    sampler = Sampler(torch.device("cpu"), V)
    batch = sampler.prepare([req])
    assert batch.penalties is not None
    return batch.penalties.apply(torch.tensor([logits])).squeeze(0).tolist()


def test_presence_and_frequency_follow_openai():
    logits = [1.0, 2.0, -1.0, 0.5, 0.0, 3.0, 1.5, -2.0]
    req = request([5, 5, 6], [1, 1, 2, 1], presence_penalty=0.5, frequency_penalty=0.25)
    want = list(logits)
    want[1] -= 0.5 + 3 * 0.25  # three times in the output
    want[2] -= 0.5 + 1 * 0.25
    assert adjusted(logits, req) == pytest.approx(want)  # prompt tokens (5, 6) untouched


def test_repetition_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = [1.0, 2.0, -1.0, 0.5, 0.0, 3.0, 1.5, -2.0]
    req = request([5, 2], [1], repetition_penalty=2.0)
    want = list(logits)
    want[1] = 2.0 / 2  # output, positive
    want[2] = -1.0 * 2  # prompt, negative
    want[5] = 3.0 / 2  # prompt, positive
    assert adjusted(logits, req) == pytest.approx(want)


def test_rows_without_penalties_are_untouched():
    sampler = Sampler(torch.device("cpu"), V)
    plain = request([1, 2], [3, 3])
    plain.request_id = "plain"
    batch = sampler.prepare([plain, request([1, 2], [3, 3], frequency_penalty=1.0)])
    logits = torch.arange(2 * V, dtype=torch.float32).view(2, V)
    out = batch.penalties.apply(logits.clone())
    assert torch.equal(out[0], logits[0]) and out[1, 3] == logits[1, 3] - 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
     ({"repetition_penalty": 0.0}, "repetition_penalty")],
)
def test_bad_penalties(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
