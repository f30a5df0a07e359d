"""vLLM's `truncate_prompt_tokens`: the truncation rule, its validation in every request model and
in SamplingParams / PoolingParams, and the offline `LLM.generate` / `LLM.embed` (no HTTP)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from pydantic import BaseModel, ValidationError

from pdserve import LLM, SamplingParams
from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.truncation import truncate_prompt
from pdserve.proxy import bodies
from pdserve.server.embedding_protocol import EmbeddingRequest
from pdserve.server.errors import from_pydantic
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest

IDS = list(range(10, 30))  # 20 ids
PROMPT = "The quick brown fox jumps over the lazy dog"  # the dummy tokenizer is byte-level: 43 ids
MAX_MODEL_LEN = 64


@pytest.mark.parametrize(
    ("k", "reserved", "kept"),
    [
        (None, 4, IDS),
        (5, 4, IDS[-5:]),
        (1, 0, IDS[-1:]),
        (20, 4, IDS),
        (40, 4, IDS),
        (-1, 50, IDS[-14:]),
        (-1, 0, IDS),
        (-1, 44, IDS),
        (-1, 45, IDS[-19:]),
    ],
)
def test_keeps_the_last_k(k: int | None, reserved: int, kept: list[int]) -> None:
    assert truncate_prompt(IDS, k, MAX_MODEL_LEN, reserved) == kept


def test_k_beyond_the_room_is_refused_before_the_prompt_length_matters() -> None:
    with pytest.raises(ValueError, match=r"^truncate_prompt_tokens=61 cannot be greater than 60: .* 64 less 4"):
        truncate_prompt(IDS, 61, MAX_MODEL_LEN, 4)
    with pytest.raises(ValueError, match=r"^truncate_prompt_tokens=65 cannot be greater than 64: .* of 64;"):
        truncate_prompt(IDS, 65, MAX_MODEL_LEN, 0)  # an embedding: the whole context
    assert truncate_prompt(IDS, 64, MAX_MODEL_LEN, 0) == IDS
    # max_tokens filling the context: nothing to truncate to; the context check refuses max_tokens.
    assert truncate_prompt(IDS, 5, MAX_MODEL_LEN, 64) == IDS


@pytest.mark.parametrize("bad", [0, -2])
def test_params_refuse_zero_and_below_minus_one(bad: int) -> None:
    for make in (lambda: SamplingParams(truncate_prompt_tokens=bad), lambda: PoolingParams(truncate_prompt_tokens=bad)):
        with pytest.raises(ValueError, match=f"truncate_prompt_tokens must be an integer >= 1 or -1, got {bad}"):
            make()
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1
    assert PoolingParams(truncate_prompt_tokens=3).truncate_prompt_tokens == 3


REQUESTS: list[tuple[type[BaseModel], dict]] = [
    (CompletionRequest, {"prompt": "hi"}),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
    (EmbeddingRequest, {"input": "hi"}),
]


@pytest.mark.parametrize(("model", "body"), REQUESTS)
def test_request_models(model: type[BaseModel], body: dict) -> None:
    def parse(value: object) -> BaseModel:
        return model.model_validate_json(json.dumps({**body, "truncate_prompt_tokens": value}))

    assert model.model_validate(body).truncate_prompt_tokens is None  # type: ignore[attr-defined]
    assert parse(7).truncate_prompt_tokens == 7  # type: ignore[attr-defined]
    assert parse(-1).truncate_prompt_tokens == -1  # type: ignore[attr-defined]
    assert parse(None).truncate_prompt_tokens is None  # type: ignore[attr-defined]
    for bad in (0, -2, "3", 2.5, True):
        with pytest.raises(ValidationError) as e:
            parse(bad)
        err = from_pydantic(e.value)
        assert (err.status, err.param, err.code) == (400, "truncate_prompt_tokens", "invalid_value"), bad


def test_only_minus_one_keeps_a_disaggregated_request_off_the_prefill() -> None:
    assert bodies.truncates_by_output({"prompt": "hi", "truncate_prompt_tokens": -1})
    for value in (None, 5, True, -1.0, "-1"):
        assert not bodies.truncates_by_output({"prompt": "hi", "truncate_prompt_tokens": value})
    half = json.loads(
        bodies.prefill_body(
            {"prompt": "hi", "truncate_prompt_tokens": 5}, "/v1/completions", bodies.prefill_params("READ")
        )
    )
    assert half["truncate_prompt_tokens"] == 5 and half["max_tokens"] == 1


# -- offline ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    m = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=32, max_model_len=MAX_MODEL_LEN, threads=1)
    yield m
    m.close()


def _greedy(**kw: int) -> SamplingParams:
    return SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, **kw)


def test_generate_keeps_the_last_k_tokens(llm: LLM) -> None:
    ids = llm.engine.tokenize(PROMPT)
    (cut,) = llm.generate(PROMPT, _greedy(truncate_prompt_tokens=10))
    (want,) = llm.generate(ids[-10:], _greedy())
    assert cut.prompt_token_ids == ids[-10:] and cut.outputs[0].token_ids == want.outputs[0].token_ids
    # vLLM 0.17's spelling, for every prompt of the call; token-id prompts too.
    both = llm.generate([PROMPT, ids], _greedy(), tokenization_kwargs={"truncate_prompt_tokens": 10})
    assert [o.outputs[0].token_ids for o in both] == [want.outputs[0].token_ids] * 2
    (short,) = llm.generate(PROMPT, _greedy(truncate_prompt_tokens=50))  # more than the prompt has
    assert short.prompt_token_ids == ids


def test_generate_minus_one_fits_the_context(llm: LLM) -> None:
    (out,) = llm.generate("x" * 200, _greedy(truncate_prompt_tokens=-1))
    assert len(out.prompt_token_ids) == MAX_MODEL_LEN - 4 and len(out.outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="context length"):  # still too long without it
        llm.generate("x" * 200, _greedy())
    with pytest.raises(ValueError, match="truncate_prompt_tokens=61 cannot be greater than 60"):
        llm.generate(PROMPT, _greedy(truncate_prompt_tokens=61))
    with pytest.raises(ValueError, match="unsupported tokenization_kwargs"):
        llm.generate(PROMPT, _greedy(), tokenization_kwargs={"truncation": True})


def test_embed_keeps_the_last_k_tokens(llm: LLM) -> None:
    ids = llm.engine.tokenize(PROMPT)
    (cut,) = llm.embed(PROMPT, PoolingParams(truncate_prompt_tokens=5))
    (want,) = llm.embed(ids[-5:])
    assert cut.prompt_token_ids == ids[-5:] and cut.embedding == pytest.approx(want.embedding, abs=1e-6)
    (same,) = llm.embed(PROMPT, tokenization_kwargs={"truncate_prompt_tokens": 5})
    assert same.embedding == pytest.approx(want.embedding, abs=1e-6)
    (whole,) = llm.embed("x" * 200, PoolingParams(truncate_prompt_tokens=-1))
    assert len(whole.prompt_token_ids) == MAX_MODEL_LEN  # nothing is generated: the whole context
