"""Sampling and stopping through the offline API on dummy:qwen3-tiny."""

from __future__ import annotations

import math

import pytest

from pdserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    m = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256)
    yield m
    m.close()


PROMPT = [(5 * j) % 250 for j in range(20)]


def toks(llm, **kw):
    return llm.generate([PROMPT], SamplingParams(**kw))[0].outputs[0]


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    a = toks(llm, max_tokens=24, temperature=1.5, seed=7, ignore_eos=True).token_ids
    b = toks(llm, max_tokens=24, temperature=1.5, seed=7, ignore_eos=True).token_ids
    c = toks(llm, max_tokens=24, temperature=1.5, seed=8, ignore_eos=True).token_ids
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    greedy = toks(llm, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert toks(llm, max_tokens=12, temperature=2.0, top_k=1, seed=1, ignore_eos=True).token_ids == greedy
    assert toks(llm, max_tokens=12, temperature=2.0, top_p=1e-6, seed=1, ignore_eos=True).token_ids == greedy


def test_top_k_restricts_choices(llm):
    # With top_k=2, every sampled token must be one of the two most likely at its step: check the
    # first token against the greedy first token and the runner-up set over many seeds.
    firsts = {toks(llm, max_tokens=1, temperature=5.0, top_k=2, seed=s).token_ids[0] for s in range(40)}
    assert len(firsts) == 2


def test_min_p_keeps_only_tokens_near_the_most_likely(llm):
    greedy = toks(llm, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert toks(llm, max_tokens=12, temperature=2.0, min_p=1.0, seed=1, ignore_eos=True).token_ids == greedy
    # At temperature T, p_i / p_max = exp((logprob_i - logprob_max) / T): the tokens min_p keeps.
    temperature, min_p = 0.1, 0.2  # the tiny model is nearly uniform: a low temperature spreads it
    top = toks(llm, max_tokens=1, temperature=0, logprobs=20).logprobs[0].top
    best = top[0][1]
    kept = {t for t, lp in top if (lp - best) / temperature >= math.log(min_p)}
    assert 1 < len(kept) < len(top)
    firsts = {toks(llm, max_tokens=1, temperature=temperature, min_p=min_p, seed=s).token_ids[0] for s in range(40)}
    assert firsts <= kept and len(firsts) > 1
    unrestricted = {toks(llm, max_tokens=1, temperature=temperature, seed=s).token_ids[0] for s in range(40)}
    assert not unrestricted <= kept


def test_stop_token_ids_and_min_tokens(llm):
    greedy = toks(llm, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    out = toks(llm, max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[greedy[3]])
    first = greedy.index(greedy[3])
    assert out.token_ids == greedy[: first + 1] and out.finish_reason == "stop"
    out = toks(llm, max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[greedy[0]], min_tokens=5)
    assert greedy[0] not in out.token_ids[:5] and len(out.token_ids) >= 5


def test_stop_string_is_cut_from_the_text(llm):
    full = toks(llm, max_tokens=16, temperature=0, ignore_eos=True)
    stop = full.text[5:8]
    out = toks(llm, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]


def test_max_tokens_and_eos(llm):
    out = toks(llm, max_tokens=3, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"n": 0}, "n must be at least 1"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[1] * 300], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="exceeds"):
        llm.generate([[1] * 200], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[100000]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=1))


@pytest.mark.parametrize(
    ("kwargs", "err"),
    [
        ({"model": "/no/such/dir"}, FileNotFoundError),
        ({"model": "dummy:nope"}, ValueError),
        ({"model": "dummy:qwen3-tiny", "dtype": "float8"}, ValueError),
    ],
)
def test_bad_engine_arguments(kwargs, err):
    with pytest.raises(err):
        LLM(**kwargs)


def test_out_of_range_values_do_not_reach_the_tensors(llm):
    """Found by the proxy fuzzer: a top_k beyond int64 failed the engine step (every request in it);
    stop ids outside the vocabulary, banned by min_tokens, indexed past the logits."""
    huge = toks(llm, max_tokens=4, temperature=0.0, top_k=10**30, ignore_eos=True).token_ids
    assert huge == toks(llm, max_tokens=4, temperature=0.0, ignore_eos=True).token_ids
    out = toks(llm, max_tokens=4, min_tokens=4, stop_token_ids=[-1, 10**6, 2**70], ignore_eos=True)
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


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


def test_logit_bias(llm):
    base = toks(llm, max_tokens=6, temperature=0.0, ignore_eos=True).token_ids
    forced = toks(llm, max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={7: 100.0}).token_ids
    assert forced == [7] * 6
    sampled = toks(llm, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, logit_bias={7: 100.0}).token_ids
    assert sampled == [7] * 6
    avoided = toks(llm, max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={t: -100.0 for t in base})
    assert not set(avoided.token_ids) & set(base)
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="logit_bias names token id"):
        llm.engine.validate_prompt([1, 2], SamplingParams(logit_bias={10**6: 1.0}))


def test_offline_n_choices_compute_the_prompt_once(llm):
    """SamplingParams(n=3) offline (vLLM's): three choices per prompt, choice i seeded seed + i, each
    equal to a single request with that seed; choices after the first start from the prompt's
    cached blocks."""
    prompts = [[(5 * i + j) % 200 for j in range(40)] for i in range(2)]
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=3)
    hits = llm.engine.stats().prefix_cache_hits
    outs = llm.generate(prompts, sp)
    assert [len(o.outputs) for o in outs] == [3, 3] and all(o.finished for o in outs)
    assert [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert llm.engine.stats().prefix_cache_hits - hits == 2 * 2 * 32  # choices 1, 2 of each: 2 blocks each
    for i in range(3):
        alone = llm.generate([prompts[1]], SamplingParams(max_tokens=6, temperature=1.0, seed=11 + i))[0]
        assert outs[1].outputs[i].token_ids == alone.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1
    llm.engine.scheduler.check_integrity()


@pytest.mark.parametrize("with_top_p", [False, True])
def test_partial_top_k_keeps_what_the_full_sort_keeps(with_top_p):
    """The partial top-k (every sampled row's top_k small) masks exactly as sorting the vocabulary:
    the same kept tokens with the same logits, top-p applied within them; a row without top-k
    (top_k = vocab) among them is a greedy row here, whose sample is discarded."""
    import torch

    from pdserve.engine.sampler import _apply_top_k_top_p, _apply_top_k_top_p_partial

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4000, generator=g) * 3
    top_k = torch.tensor([1, 20, 50, 7, 4000])
    top_p = torch.tensor([1.0, 0.95, 0.5, 0.8, 1.0]) if with_top_p else None
    full = _apply_top_k_top_p(logits, top_k, top_p)
    part = _apply_top_k_top_p_partial(logits, top_k, top_p, 50)
    torch.testing.assert_close(part[:4], full[:4], rtol=0, atol=0)
    assert int(torch.isfinite(full[1]).sum()) <= 20 and int(torch.isfinite(full[0]).sum()) == 1


def test_sampling_with_small_top_k_takes_the_partial_path_and_samples_as_before(monkeypatch):
    """A request with top_k 20 and top_p 0.9 (Qwen3's generation defaults): the same seeded tokens
    whether the sampler sorts the whole vocabulary or takes the partial top-k."""
    import pdserve.engine.sampler as sampler

    llm = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=5, ignore_eos=True)
    fast = [o.outputs[0].token_ids for o in llm.generate([[1, 2, 3], [9, 8, 7, 6]], sp)]
    monkeypatch.setattr(sampler, "TOP_K_PARTIAL_MAX", 0)  # always sort
    slow = [o.outputs[0].token_ids for o in llm.generate([[1, 2, 3], [9, 8, 7, 6]], sp)]
    assert fast == slow
