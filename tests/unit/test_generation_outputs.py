"""A generation's outputs as its reader gets them: those that piled up while it was busy come merged
into one, which keeps every token, in order, with its logprobs; an error stays on its own."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.logprobs import TokenLogprob
from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.context import ServerContext
from pdserve.server.generation import GenerationInput, merge_outputs
from pdserve.server.settings import ServerSettings

MODEL = "dummy:qwen3-tiny"


def lp(token_id: int) -> TokenLogprob:
    return TokenLogprob(token_id, -0.5 * token_id, 1, ((token_id, -0.5 * token_id),))


def test_merge_joins_tokens_text_and_logprobs_in_order() -> None:
    prompt_lps = [lp(9)]
    outs = [
        StepOutput("r", [1], "a", False, logprobs=[lp(1)], prompt_logprobs=prompt_lps, num_output_tokens=1),
        StepOutput("r", [2, 3], "bc", False, logprobs=[lp(2), lp(3)], num_output_tokens=3),
        StepOutput("r", [4], "d", True, "length", num_prompt_tokens=5, num_output_tokens=4, logprobs=[lp(4)],
                   kv_transfer_params={"k": 1}),
    ]
    [merged] = merge_outputs(outs)
    assert merged.new_token_ids == [1, 2, 3, 4] and merged.new_text == "abcd"
    assert merged.logprobs == [lp(1), lp(2), lp(3), lp(4)] and merged.prompt_logprobs == prompt_lps
    assert merged.finished and merged.finish_reason == "length" and merged.kv_transfer_params == {"k": 1}
    assert (merged.num_prompt_tokens, merged.num_output_tokens) == (5, 4)


def test_merge_without_logprobs_and_a_final_output_without_tokens() -> None:
    outs = [StepOutput("r", [1], "a", False), StepOutput("r", [2], "b", False), StepOutput("r", [], "", True, "abort")]
    [merged] = merge_outputs(outs)
    assert (merged.new_token_ids, merged.new_text, merged.logprobs) == ([1, 2], "ab", None)
    assert merged.finished and merged.finish_reason == "abort"


def test_an_error_is_not_merged_with_the_tokens_before_it() -> None:
    outs = [StepOutput("r", [1], "a", False), StepOutput("r", [2], "b", False),
            StepOutput("r", [], "", True, "error", error="boom")]
    tokens, error = merge_outputs(outs)
    assert tokens.new_token_ids == [1, 2] and not tokens.finished
    assert error is outs[2]


def test_a_reader_that_fell_behind_gets_every_token_at_once(engine: AsyncEngine) -> None:
    """The same greedy request read as it comes and read only once it has finished."""
    params = SamplingParams(max_tokens=12, min_tokens=12, ignore_eos=True, temperature=0.0, logprobs=2)
    prompt = [3, 14, 15, 92, 65, 35]

    async def go() -> tuple[list[StepOutput], list[StepOutput]]:
        ctx = ServerContext(engine, ServerSettings(served_model_names=(MODEL,)))
        # Salted apart: the second finds nothing of the first's prompt in the prefix cache.
        eager = ctx.start(GenerationInput("eager", prompt, params, None, time.monotonic(), cache_salt="a"))
        read = [out async for out in eager.outputs()]
        late = ctx.start(GenerationInput("late", prompt, params, None, time.monotonic(), cache_salt="b"))
        while not late.finished:  # every output delivered, none read
            await asyncio.sleep(0.01)
        return read, [out async for out in late.outputs()]

    read, [merged] = asyncio.run(go())
    assert merged.finished and merged.finish_reason == read[-1].finish_reason == "length"
    assert merged.new_token_ids == [t for out in read for t in out.new_token_ids] and len(merged.new_token_ids) == 12
    assert merged.new_text == "".join(out.new_text for out in read)
    logprobs = [x for out in read for x in out.logprobs or ()]
    assert merged.logprobs is not None and len(merged.logprobs) == len(logprobs) == 12
    for got, want in zip(merged.logprobs, logprobs, strict=True):
        assert (got.token_id, got.rank, [t for t, _ in got.top]) == (want.token_id, want.rank, [t for t, _ in want.top])
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
    assert merged.num_output_tokens == read[-1].num_output_tokens == 12
