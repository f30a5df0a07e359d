"""Beam search (vLLM's): the pure algorithm on a hand-built next-token distribution, then offline
`LLM.beam_search` on the tiny dummy model (greedy equivalence, never worse than greedy, the prefix
cache reusing the beams' shared prefixes), and the server's driver on the AsyncEngine (the same
beams as offline; an abort ends every beam's request)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.beam_search import (
    BeamSearch,
    BeamSearchParams,
    BeamSearchSequence,
    beam_search_score,
    candidates,
)
from pdserve.engine.logprobs import TokenLogprob
from pdserve.server.beam_search import BeamInput, BeamSearchRun
from pdserve.server.generation import Collected
from pdserve.server.metrics import ServerMetrics

EOS = 0
PROMPT = [100]
# Next-token probabilities by the last token (a Markov chain): after the prompt 1 is likelier than
# 2, but 2 leads to 6 with 0.9, so the greedy path 1 4 7 (0.096) loses to the beam 2 6 7 (0.216).
CHAIN: dict[int, dict[int, float]] = {
    100: {1: 0.5, 2: 0.4, EOS: 0.05, 3: 0.05},
    1: {4: 0.32, 5: 0.28, EOS: 0.22, 3: 0.18},
    2: {6: 0.9, EOS: 0.05, 3: 0.03, 4: 0.02},
}
OTHERS = {7: 0.6, EOS: 0.3, 8: 0.05, 9: 0.05}


def chain_step(tokens: Sequence[int]) -> TokenLogprob:
    """The hand-built model's step: the likeliest 4 (= 2 * beam width 2) tokens, the first sampled."""
    top = tuple((t, math.log(p)) for t, p in sorted(CHAIN.get(tokens[-1], OTHERS).items(), key=lambda kv: -kv[1]))
    return TokenLogprob(top[0][0], top[0][1], 1, top)


def search(
    params: BeamSearchParams, step: Callable[[Sequence[int]], TokenLogprob] = chain_step, prompt: list[int] = PROMPT
) -> list[BeamSearchSequence]:
    s = BeamSearch(prompt, params, (EOS,))
    while not s.done:
        s.advance([step(beam.tokens) for beam in s.live])
    return s.result()


def test_hand_computed_beams() -> None:
    """Step 1: 1 (.5) and 2 (.4) live, [EOS] completed. Step 2: 2 6 (.36) and 1 4 (.16) live, 1 EOS
    (.11) and 2 EOS (.02) completed. Step 3: 2 6 7 (.216) and 1 4 7 (.096) live, 2 6 EOS (.108) and
    1 4 EOS (.048) completed. Scores (length penalty 1, the prompt counted, a final EOS not):
    ln .216 / 4 > ln .096 / 4 > ln .108 / 3 > ..."""
    best = search(BeamSearchParams(beam_width=2, max_tokens=3))
    assert [b.output_token_ids for b in best] == [[2, 6, 7], [1, 4, 7]]
    assert [b.cum_logprob for b in best] == pytest.approx([math.log(0.4 * 0.9 * 0.6), math.log(0.5 * 0.32 * 0.6)])
    assert [b.finish_reason for b in best] == ["length", "length"]
    assert [lp.rank for lp in best[0].logprobs] == [2, 1, 1]  # 2 was the second likeliest after the prompt
    assert best[0].tokens == PROMPT + [2, 6, 7] and best[0].num_prompt_tokens == 1
    greedy = math.log(0.5 * 0.32 * 0.6)
    assert best[0].cum_logprob > greedy  # the beam found what greedy decoding missed


def test_length_penalty_orders_completed_beams() -> None:
    """Length penalty 0 ranks by cumulative logprob alone: the short EOS-completed 1 EOS (.11) beats
    1 4 7 (.096); with 1 the longer one wins (ln .11 / 2 < ln .096 / 4)."""
    plain = search(BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=0.0))
    assert [b.output_token_ids for b in plain] == [[2, 6, 7], [1, EOS]]
    done = plain[1]
    assert done.finish_reason == "stop" and done.stop_reason == EOS
    assert done.cum_logprob == pytest.approx(math.log(0.5 * 0.22))
    assert done.shown_token_ids(include_stop=False) == [1] and done.shown_token_ids(include_stop=True) == [1, EOS]
    assert beam_search_score(done.tokens, done.cum_logprob, {EOS}, 1.0) == pytest.approx(math.log(0.11) / 2)
    normalised = search(BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=1.0))
    assert [b.output_token_ids for b in normalised] == [[2, 6, 7], [1, 4, 7]]


def test_ignore_eos_keeps_eos_beams_alive() -> None:
    s = BeamSearch(PROMPT, BeamSearchParams(beam_width=3, max_tokens=1, ignore_eos=True), (EOS,))
    s.advance([chain_step(PROMPT)])
    assert not s.completed and [b.output_token_ids for b in s.live] == [[1], [2], [EOS]]


def test_score_and_candidates() -> None:
    assert beam_search_score([5, 6, EOS], -3.0, {EOS}, 1.0) == pytest.approx(-1.5)
    assert beam_search_score([5, 6, 7], -3.0, {EOS}, 1.0) == pytest.approx(-1.0)
    assert beam_search_score([5, 6, 7], -3.0, {EOS}, 0.0) == pytest.approx(-3.0)
    # Penalties whose len ** penalty leaves a float (the server accepts any finite one): the limits,
    # not an OverflowError / ZeroDivisionError (a 500, found by the proxy's fuzz test).
    assert beam_search_score([5] * 1000, -3.0, {EOS}, 128.0) == 0.0
    assert beam_search_score([5] * 1000, -3.0, {EOS}, -1e4) == -math.inf
    # vLLM's logprobs always hold the sampled token: one outside the likeliest is a candidate too.
    sampled = TokenLogprob(42, -9.0, 50, ((1, -0.1), (2, -0.5)))
    assert [(c.token_id, c.rank) for c in candidates(sampled, 2)] == [(1, 1), (2, 2), (42, 50)]
    assert len(candidates(TokenLogprob(1, -0.1, 1, ((1, -0.1), (2, -0.5))), 2)) == 2
    # More alternatives computed (shown to the client) than the search looks at: only the first k count.
    assert [c.token_id for c in candidates(TokenLogprob(2, -0.5, 2, ((1, -0.1), (2, -0.5), (3, -0.9))), 1)] == [1, 2]


@pytest.mark.parametrize("kw", [{"beam_width": 0}, {"beam_width": 11}, {"max_tokens": 0}, {"temperature": -1.0}])
def test_params_are_validated(kw: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kw})


# -- offline, on the tiny dummy model -------------------------------------------------------------
PROMPTS = ["The quick brown fox", "A much longer prompt that spans more than one block of sixteen tokens"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=128)


def _pool_free(llm: LLM) -> None:
    llm.engine.scheduler.check_integrity()
    llm.engine.block_pool.check_integrity()
    assert llm.engine.block_pool.num_free == llm.engine.block_pool.num_usable


def test_width_one_is_greedy(llm: LLM) -> None:
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for out, ref in zip(beams, greedy, strict=True):
        (seq,) = out.sequences
        assert seq.output_token_ids == ref.outputs[0].token_ids
    _pool_free(llm)


def test_best_beam_is_at_least_as_likely_as_greedy(llm: LLM) -> None:
    params = BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True)
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0))
    for out, ref in zip(llm.beam_search(PROMPTS, params), greedy, strict=True):
        assert len(out.sequences) == 4
        scores = [s.cum_logprob for s in out.sequences]  # all of one length: the score orders by cum_logprob
        assert scores == sorted(scores, reverse=True)
        best = out.sequences[0]
        assert best.cum_logprob == pytest.approx(sum(lp.logprob for lp in best.logprobs))
        assert best.cum_logprob >= (ref.outputs[0].cumulative_logprob or 0.0) - 1e-5
    _pool_free(llm)


def test_offline_output_shape(llm: LLM) -> None:
    """vLLM's BeamSearchOutput: tokens and text include the prompt; prompt dicts, text or ids."""
    ids = llm.engine.tokenize(PROMPTS[0])
    outs = llm.beam_search(
        [{"prompt": PROMPTS[0]}, {"prompt_token_ids": ids}, ids], BeamSearchParams(beam_width=2, max_tokens=3)
    )
    first = outs[0].sequences
    assert all([s.tokens for s in o.sequences] == [s.tokens for s in first] for o in outs)
    for seq in first:
        assert seq.tokens[: len(ids)] == ids and seq.text is not None and seq.text.startswith(PROMPTS[0])
        assert seq.finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="max_tokens"):
        llm.beam_search([PROMPTS[0]], BeamSearchParams(beam_width=2, max_tokens=llm.engine.max_model_len))
    _pool_free(llm)


def test_allowed_token_ids_restrict_every_beam(llm: LLM) -> None:
    """vLLM's allowed_token_ids: every beam holds only allowed tokens (ids the unrestricted search
    never picks), and so do the alternatives its logprobs list; its cumulative logprob is the
    model's own logprobs summed; width 1 is greedy decoding under the same restriction; an id
    outside the vocabulary is refused before any runs."""
    ids = llm.engine.tokenize(PROMPTS[0])
    free = llm.beam_search([ids], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))[0]
    used = {t for s in free.sequences for t in s.output_token_ids}
    allowed = [t for t in (97, 98, 99, 300, 301, 302) if t not in used][:4]
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True, allowed_token_ids=allowed)
    out = llm.beam_search([ids], params)[0]
    assert len(out.sequences) == 3 and len({tuple(s.tokens) for s in out.sequences}) == 3
    for seq in out.sequences:
        assert len(seq.output_token_ids) == 6 and set(seq.output_token_ids) <= set(allowed)
        assert all(t in allowed for lp in seq.logprobs for t, _ in lp.top)
        assert seq.cum_logprob == pytest.approx(sum(lp.logprob for lp in seq.logprobs))
    greedy = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                allowed_token_ids=allowed, logprobs=0))[0].outputs[0]
    (one,) = llm.beam_search([ids], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True,
                                                     allowed_token_ids=allowed))[0].sequences
    assert one.output_token_ids == greedy.token_ids
    assert one.cum_logprob == pytest.approx(greedy.cumulative_logprob, abs=1e-4)  # the model's own logprobs
    # One allowed id: every beam is that id repeated (fewer candidates than 2n: no -inf filler).
    single = llm.beam_search([ids], BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True,
                                                     allowed_token_ids=[allowed[0]]))[0].sequences
    assert all(s.output_token_ids == [allowed[0]] * 3 for s in single)
    with pytest.raises(ValueError, match="^allowed_token_ids"):
        llm.beam_search([ids], BeamSearchParams(beam_width=2, max_tokens=3, allowed_token_ids=[5, 512]))
    with pytest.raises(ValueError, match="^allowed_token_ids must not be empty"):
        BeamSearchParams(beam_width=2, max_tokens=3, allowed_token_ids=[])
    _pool_free(llm)


def test_prefix_cache_serves_the_shared_prefixes(llm: LLM) -> None:
    """Each step sends every beam whole, but all its blocks but the last come from the prefix cache:
    the tokens computed stay linear in the steps (at most a block per beam per step past the prompt),
    never the sum of the beams' lengths."""
    prompt = llm.engine.tokenize(PROMPTS[1] * 3)
    width, steps = 3, 10
    before = llm.engine.stats()
    llm.beam_search([prompt], BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True))
    after = llm.engine.stats()
    queried = after.prefix_cache_queries - before.prefix_cache_queries
    computed = queried - (after.prefix_cache_hits - before.prefix_cache_hits)
    block = llm.engine.layout.block_size
    assert queried > steps * len(prompt)  # every beam sent whole every step
    assert computed <= len(prompt) + (steps - 1) * width * block
    _pool_free(llm)


# -- the server's driver, on the AsyncEngine -------------------------------------------------------
def _serve(llm: LLM, inp: BeamInput, abort_after_s: float | None = None) -> tuple[list[Collected], list[str]]:
    """Run one search through server/beam_search.py on an AsyncEngine over `llm`'s engine."""

    async def main() -> tuple[list[Collected], list[str]]:
        engine = AsyncEngine(llm.engine)
        try:
            done: list[str] = []
            metrics = ServerMetrics(lambda: engine.stats, lambda: 0)
            eos = llm.engine.loaded.eos_token_ids
            run = BeamSearchRun(engine, inp, llm.engine.tokenizer, eos, metrics, done.append)
            if abort_after_s is not None:
                await asyncio.sleep(abort_after_s)
                run.abort()
            return await run.results(), done
        finally:
            engine.shutdown()

    return asyncio.run(main())


def test_server_driver_matches_offline(llm: LLM) -> None:
    params = BeamSearchParams(beam_width=3, max_tokens=5)
    prompt = llm.engine.tokenize(PROMPTS[1])
    want = llm.beam_search([prompt], params)[0].sequences
    got, done = _serve(llm, BeamInput("r", prompt, params, time.monotonic(), logprobs=0))
    assert [c.token_ids for c in got] == [s.shown_token_ids(False) for s in want]
    assert [sum(lp.logprob for lp in c.logprobs) for c in got] == pytest.approx(
        [sum(lp.logprob for lp in s.logprobs[: len(c.token_ids)]) for c, s in zip(got, want, strict=True)]
    )
    assert all(c.final.num_prompt_tokens == len(prompt) for c in got) and done == ["r"]
    _pool_free(llm)


def test_server_driver_abort_frees_every_beam(llm: LLM) -> None:
    params = BeamSearchParams(beam_width=4, max_tokens=3000, ignore_eos=True)
    got, done = _serve(llm, BeamInput("a", llm.engine.tokenize(PROMPTS[0]), params, time.monotonic()), 0.3)
    assert [c.final.finish_reason for c in got] == ["abort"] * 4 and done == ["a"]
    assert not llm.engine.has_unfinished()
    _pool_free(llm)
