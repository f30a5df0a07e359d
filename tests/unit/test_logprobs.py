"""Logprobs of generated tokens (`SamplingParams.logprobs`): the model's own distribution, checked
against transformers on the same weights (fp32), for greedy and sampled tokens, in a batch."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model.export import export_model

transformers = pytest.importorskip("transformers")

MODEL = "dummy:qwen3-tiny"
PROMPTS = [[(5 * j) % 250 for j in range(20)], [(7 * j + 3) % 250 for j in range(45)]]


@pytest.fixture(scope="module")
def llm():
    m = LLM(MODEL, dtype="float32", num_kv_blocks=64, max_model_len=256)
    yield m
    m.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = export_model(MODEL, tmp_path_factory.mktemp("hf"), dtype="float32")
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def reference_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), V]: log_softmax of transformers' logits at each generated position."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.3, "top_k": 50, "seed": 3}])
def test_logprobs_match_transformers(llm, reference, sampling):
    k = 5
    params = [SamplingParams(max_tokens=8, ignore_eos=True, logprobs=k, **sampling) for _ in PROMPTS]
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params), strict=True):
        comp = out.outputs[0]
        assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids) == 8
        ref = reference_logprobs(reference, prompt, comp.token_ids)
        for i, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
            assert lp.token_id == tok
            assert lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-4)
            assert lp.rank == int((ref[i] > ref[i, tok] + 1e-6).sum()) + 1  # within rounding of ties
            top_v, top_i = ref[i].topk(k)
            assert [t for t, _ in lp.top] == top_i.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)
            if sampling["temperature"] == 0.0:
                assert lp.rank == 1 and lp.top[0][0] == tok
        assert comp.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in comp.logprobs))


def test_logprobs_are_before_temperature_and_bans(llm):
    """The raw distribution: the same values whatever the temperature, and a token banned from
    sampling (min_tokens not reached, here the argmax itself) still shows with its own logprob."""
    a = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0.0, logprobs=3))[0].outputs[0]
    best = a.token_ids[0]
    hot = SamplingParams(max_tokens=1, temperature=50.0, top_k=1, logprobs=3)  # top_k=1: still the argmax
    c = llm.generate([PROMPTS[0]], hot)[0].outputs[0]
    assert c.token_ids == [best] and c.logprobs[0].logprob == pytest.approx(a.logprobs[0].logprob, abs=1e-6)
    banned = SamplingParams(max_tokens=2, temperature=0.0, logprobs=3, min_tokens=2, stop_token_ids=[best])
    b = llm.generate([PROMPTS[0]], banned)[0].outputs[0]
    assert b.token_ids[0] == a.logprobs[0].top[1][0]  # the runner-up was sampled
    assert b.logprobs[0].rank == 2
    assert [t for t, _ in b.logprobs[0].top] == [t for t, _ in a.logprobs[0].top]
    assert [v for _, v in b.logprobs[0].top] == pytest.approx([v for _, v in a.logprobs[0].top], abs=1e-6)


def test_only_requests_that_ask_get_logprobs(llm):
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=3, logprobs=0), SamplingParams(max_tokens=3)])
    asked, plain = outs[0].outputs[0], outs[1].outputs[0]
    assert [lp.top for lp in asked.logprobs] == [(), (), ()]
    assert all(lp.logprob <= 0.0 for lp in asked.logprobs)
    assert plain.logprobs is None and plain.cumulative_logprob is None


def test_resolving_some_rows_gives_what_resolving_all_gives_for_them():
    """The runner resolves only the rows it emits that asked (a speculative step discards most)."""
    from pdserve.engine.logprobs import BatchLogprobs

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    batch = BatchLogprobs.of(logits, [2, None, 0, 4, 1])
    assert batch is not None
    sampled = torch.tensor([3, 1, 4, 1, 5])
    full = batch.resolve(sampled)
    assert batch.resolve(sampled, [3, 0, 2]) == [full[3], full[0], full[2]]
    assert batch.resolve(sampled, []) == []


@pytest.mark.parametrize("value", [-1, 21])
def test_bad_logprobs(value):
    with pytest.raises(ValueError, match="logprobs must be in"):
        SamplingParams(logprobs=value)


@pytest.mark.parametrize("chunk", [None, 16])
def test_prompt_logprobs_match_transformers(reference, chunk):
    """Every prompt token after the first, under the logits of the position before it; computed
    once even when the prompt is prefilled in several chunks."""
    kw = {} if chunk is None else {"max_num_batched_tokens": chunk}
    llm = LLM(MODEL, dtype="float32", num_kv_blocks=64, max_model_len=256, **kw)
    try:
        params = [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2, logprobs=1),
                  SamplingParams(max_tokens=2, temperature=0.0)]
        asked, plain = llm.generate(PROMPTS, params)
    finally:
        llm.close()
    assert plain.prompt_logprobs is None
    prompt = PROMPTS[0]
    got = asked.prompt_logprobs
    assert got is not None and len(got) == len(prompt) - 1
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = torch.log_softmax(reference(ids).logits[0, :-1].float(), dim=-1)
    for i, lp in enumerate(got):
        assert lp.token_id == prompt[i + 1]
        assert lp.logprob == pytest.approx(ref[i, prompt[i + 1]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[i].topk(2).indices.tolist()


def test_prompt_logprobs_from_one_token_chunks(reference):
    """A decode running beside it leaves one token of a 2-token budget: the prompt is prefilled one
    token per step, and each of those steps still yields its position's prompt logprob."""
    llm = LLM(MODEL, dtype="float32", num_kv_blocks=64, max_model_len=256, max_num_batched_tokens=2,
              enable_prefix_caching=False)
    try:
        engine = llm.engine
        engine.add_request("decode", [1, 2], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        engine.step()
        prompt = PROMPTS[0][:10]
        engine.add_request("asked", prompt, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
        outs = [o for o in engine.run_until_done() if o.request_id == "asked" and o.prompt_logprobs is not None]
    finally:
        llm.close()
    got = outs[0].prompt_logprobs
    assert got is not None and [lp.token_id for lp in got] == prompt[1:]
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    for i, lp in enumerate(got):
        assert lp.logprob == pytest.approx(ref[i, prompt[i + 1]].item(), abs=1e-4)


def test_prompt_logprobs_refused_for_remote_prefill():
    from pdserve.config import EngineConfig
    from pdserve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=MODEL, dtype="float32"))
    try:
        remote = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_handshake_port": 1,
                  "remote_notify_port": 2, "remote_block_ids": [0]}
        with pytest.raises(ValueError, match="prompt logprobs need the prompt computed"):
            engine.validate_request([1, 2, 3], SamplingParams(prompt_logprobs=0), remote)
    finally:
        engine.close()
