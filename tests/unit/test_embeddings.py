"""Embedding requests (`LLM.embed`, pooling in the engine) against transformers on the same random
weights (fp32): the final-norm hidden state of the last prompt token (or the mean over the prompt),
L2-normalized; alone, chunked, from cached prefixes, and in one batch with generation requests."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, PoolingParams, SamplingParams
from pdserve.model.export import export_model

transformers = pytest.importorskip("transformers")

MODEL = "dummy:qwen3-tiny"
PROMPTS = [[(5 * j + 1) % 250 for j in range(37)], [(7 * j + 3) % 250 for j in range(9)],
           [(3 * j + 2) % 250 for j in range(70)]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(export_model(MODEL, tmp_path_factory.mktemp("hf"), dtype="float32"))


@pytest.fixture(scope="module")
def hidden(model_dir):
    """Each prompt's final-norm hidden states, [len, H], from transformers' base model."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf.model(torch.tensor([p])).last_hidden_state[0] for p in PROMPTS]


def reference(states: torch.Tensor, pooling: str) -> list[float]:
    vec = states[-1] if pooling == "last" else states.mean(0)
    return torch.nn.functional.normalize(vec, dim=-1).tolist()


def _llm(model_dir: str, **kw) -> LLM:
    return LLM(model_dir, dtype="float32", num_kv_blocks=64, **kw)


def _close(llm: LLM) -> None:
    eng = llm.engine
    eng.scheduler.check_integrity()
    assert eng.block_pool.num_free == eng.block_pool.num_blocks, "every block came back"
    assert not eng.runner.pooler._sums
    llm.close()


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("chunk", [2048, 16])
def test_embed_matches_transformers(model_dir, hidden, pooling, chunk):
    llm = _llm(model_dir, pooling_type=pooling, max_num_batched_tokens=chunk)
    outs = llm.embed(PROMPTS)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    for out, states in zip(outs, hidden, strict=True):
        assert len(out.embedding) == llm.engine.model_config.hidden_size
        assert out.outputs.embedding is out.embedding  # where vLLM's code reads it
        assert out.embedding == pytest.approx(reference(states, pooling), abs=1e-4)
    _close(llm)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_prefix_cache_hit(model_dir, hidden, pooling):
    """The same prompt again: "last" starts from the cached blocks (all but its last token's),
    "mean" does not look them up; both give the reference."""
    llm = _llm(model_dir, pooling_type=pooling)
    llm.embed(PROMPTS[2])
    again = llm.embed(PROMPTS[2])[0]
    assert again.num_cached_tokens == (64 if pooling == "last" else 0)
    assert again.embedding == pytest.approx(reference(hidden[2], pooling), abs=1e-4)
    if pooling == "last":  # 64 tokens cached: the last one alone is computed, as a one-token prefill
        one = llm.embed(PROMPTS[2][:65])[0]
        assert one.num_cached_tokens == 64
        assert one.embedding == pytest.approx(reference(hidden[2][:65], pooling), abs=1e-4)
    _close(llm)


def test_mixed_with_generation(model_dir, hidden):
    """Embedding requests in the same steps as generation requests (chunked): the generated tokens
    are those of generation alone, the embeddings those of embedding alone."""
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = _llm(model_dir)
    expected = [o.outputs[0].token_ids for o in alone.generate(PROMPTS, sp)]
    _close(alone)
    llm = _llm(model_dir, max_num_batched_tokens=48)
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"g{i}", p, sp)
        eng.add_request(f"e{i}", p, sp, pooling=PoolingParams(pooling_type="mean" if i == 1 else None))
    outs = eng.run_until_done()
    tokens: dict[str, list[int]] = {}
    finals = {}
    for o in outs:
        tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        if o.finished:
            finals[o.request_id] = o
    for i, states in enumerate(hidden):
        assert tokens[f"g{i}"] == expected[i]
        assert tokens[f"e{i}"] == [] and finals[f"e{i}"].finish_reason == "stop"
        assert finals[f"e{i}"].num_output_tokens == 0 and finals[f"e{i}"].num_prompt_tokens == len(PROMPTS[i])
        pooling = "mean" if i == 1 else "last"
        assert finals[f"e{i}"].embedding == pytest.approx(reference(states, pooling), abs=1e-4)
    _close(llm)


def test_dimensions_and_normalize(model_dir, hidden):
    llm = _llm(model_dir)
    short = llm.embed(PROMPTS[0], PoolingParams(dimensions=16))[0].embedding
    last = hidden[0][-1]
    assert short == pytest.approx(torch.nn.functional.normalize(last[:16], dim=-1).tolist(), abs=1e-4)
    raw = llm.embed(PROMPTS[0], PoolingParams(normalize=False))[0].embedding
    assert raw == pytest.approx(last.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed(PROMPTS[0], PoolingParams(dimensions=10_000))
    with pytest.raises(ValueError, match="empty"):
        llm.embed([[]])
    with pytest.raises(ValueError, match="context length"):
        llm.embed([[1] * 5000])
    _close(llm)


def test_abort_mid_prefill_forgets_the_sum(model_dir):
    llm = _llm(model_dir, pooling_type="mean", max_num_batched_tokens=16)
    eng = llm.engine
    eng.add_request("e", PROMPTS[2], SamplingParams(), pooling=PoolingParams())
    eng.step()
    assert eng.runner.pooler._sums
    assert eng.abort_request("e")
    out = eng.step()
    assert out[0].finish_reason == "abort" and out[0].embedding is None
    _close(llm)


def test_mean_under_preemption(model_dir, hidden):
    """A cache too small for everything: the embedding request (the newest) is preempted mid-prompt
    and recomputed; its mean starts afresh."""
    llm = LLM(model_dir, dtype="float32", num_kv_blocks=7, max_num_batched_tokens=16, pooling_type="mean")
    eng = llm.engine
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    eng.add_request("g", PROMPTS[0], sp)
    eng.add_request("e", PROMPTS[2], sp, pooling=PoolingParams())
    finals = {o.request_id: o for o in eng.run_until_done() if o.finished}
    assert eng.scheduler.num_preemptions > 0
    assert finals["e"].embedding == pytest.approx(reference(hidden[2], "mean"), abs=1e-4)
    _close(llm)
