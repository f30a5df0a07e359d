"""Presence, frequency and repetition penalties: the sampler's arithmetic on chosen logits, and
their effect on whole generations through the offline API."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
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


@pytest.fixture(scope="module")
def llm():
    m = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256)
    yield m
    m.close()


PROMPT = [(5 * j) % 250 for j in range(20)]


def test_penalties_stop_repetition_in_greedy_generation(llm):
    base = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    plain = llm.generate([PROMPT], base)[0].outputs[0].token_ids
    assert len(set(plain)) < len(plain)  # the tiny random model loops without a penalty
    for kw in ({"repetition_penalty": 100.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        sp = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, **kw)
        out = llm.generate([PROMPT], sp)[0].outputs[0].token_ids
        assert len(set(out)) == len(out), kw  # its logits differ by far less than a penalty of 2
        if "repetition_penalty" in kw:
            assert not set(out) & set(PROMPT)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
     ({"repetition_penalty": 0.0}, "repetition_penalty")],
)
def test_bad_penalties(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
