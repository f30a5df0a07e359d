"""The engine against transformers' greedy generation on the same random weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.model.export import export_model

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (5, 17, 40, 3, 70)
NEW_TOKENS = 12


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, min(vocab, 256), (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=["dummy:qwen3-tiny", "dummy:qwen3-moe-tiny"])
def model_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param.split(":")[1])
    export_model(request.param, out, dtype="float32")
    return str(out)


@pytest.fixture(scope="module")
def reference(model_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in _prompts(hf.config.vocab_size):
        with torch.no_grad():
            ids = hf.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=0,
            )
        outs.append(ids[0, len(p):].tolist())
    return outs


def _generate(model_dir: str, **engine_kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(model_dir, dtype="float32", **engine_kw)
    prompts = _prompts(llm.engine.model_config.vocab_size)
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, sp)
    return [o.outputs[0].token_ids for o in outs], llm


def _assert_pool_full(llm: LLM) -> None:
    eng = llm.engine
    eng.scheduler.check_integrity()
    assert eng.block_pool.num_free == eng.block_pool.num_blocks
    llm.close()


def test_greedy_matches_transformers(model_dir, reference):
    got, llm = _generate(model_dir, num_kv_blocks=128)
    assert got == reference
    _assert_pool_full(llm)


def test_greedy_matches_with_small_chunks(model_dir, reference):
    got, llm = _generate(model_dir, num_kv_blocks=128, max_num_batched_tokens=32)
    assert got == reference
    _assert_pool_full(llm)


def test_greedy_matches_under_preemption(model_dir, reference):
    # 11 blocks of 16 tokens cannot hold all five sequences at once: the scheduler must preempt.
    got, llm = _generate(model_dir, num_kv_blocks=11, max_num_batched_tokens=64)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == reference
    _assert_pool_full(llm)


def test_greedy_matches_from_cached_prefixes(model_dir, reference):
    """Prompts whose prefixes were computed by earlier requests (and the same prompts again) start
    from cached blocks, and still generate what transformers does; logprobs equal an uncached run."""
    llm = LLM(model_dir, dtype="float32", num_kv_blocks=128)
    prompts = _prompts(llm.engine.model_config.vocab_size)
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)
    llm.generate([p[: len(p) * 2 // 3] + [1, 2] for p in prompts], sp)  # shared prefixes, other endings
    for round_ in range(2):  # then the prompts themselves, twice
        outs = llm.generate(prompts, sp)
        assert [o.outputs[0].token_ids for o in outs] == reference
        cached = [o.num_cached_tokens for o in outs]
        assert cached == [((len(p) * 2 // 3 if round_ == 0 else len(p) - 1) // 16) * 16 for p in prompts]
    assert sum(cached) > 0
    plain = LLM(model_dir, dtype="float32", num_kv_blocks=128, enable_prefix_caching=False)
    want = plain.generate(prompts, sp)
    for o, w in zip(outs, want, strict=True):
        got_lp = [lp.logprob for lp in o.outputs[0].logprobs]
        want_lp = [lp.logprob for lp in w.outputs[0].logprobs]
        assert got_lp == pytest.approx(want_lp, abs=1e-4)
    assert plain.engine.stats().prefix_cache_hits == 0
    plain.close()
    _assert_pool_full(llm)
