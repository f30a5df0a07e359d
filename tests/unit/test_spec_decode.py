"""Speculative decoding end to end in the engine: the same tokens (and logprobs) as without it.

dummy:qwen3-tiny in float32: with random weights its greedy output soon cycles, so n-gram drafts
taken from its own output are accepted; random prompts give drafts that are mostly rejected.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.config import CacheConfig, EngineConfig, KVTransferConfig, SchedulerConfig, SpeculativeConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import StructuredOutputs
from pdserve.engine.spec.stats import SpecDecodeStats
from pdserve.engine.structured import StructuredOutputManager
from pdserve.server.protocol import FunctionDef
from pdserve.server.tool_parsers import make_tool_parser
from tests.unit.test_kv_transfer import close, disagg, run, wait_blocks_free

MODEL = "dummy:qwen3-tiny"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    passage = torch.randint(0, 256, (24,), generator=g).tolist()
    return [passage * 3, torch.randint(0, 256, (37,), generator=g).tolist(), passage[:5] * 6,
            torch.randint(0, 256, (9,), generator=g).tolist()]


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM(MODEL, dtype="float32", num_kv_blocks=96)


@pytest.fixture(scope="module")
def spec() -> LLM:
    return LLM(MODEL, dtype="float32", num_kv_blocks=96, speculative_config=SPEC)


def tokens(llm: LLM, sps: SamplingParams | list[SamplingParams], ps: list[list[int]] | None = None) -> list[list[int]]:
    ps = ps or prompts()
    if not isinstance(sps, SamplingParams):
        ps = [ps[i % len(ps)] for i in range(len(sps))]
    return [c.token_ids for o in llm.generate(ps, sps) for c in o.outputs]


def assert_idle(llm: LLM) -> None:
    eng = llm.engine
    eng.scheduler.check_integrity()
    assert not eng.scheduler.requests
    assert eng.block_pool.num_free == eng.block_pool.num_usable


def delta(llm: LLM, before: SpecDecodeStats) -> SpecDecodeStats:
    now = llm.spec_decode_stats()
    assert now is not None
    return SpecDecodeStats(now.num_drafts - before.num_drafts, now.num_draft_tokens - before.num_draft_tokens,
                           now.num_accepted_tokens - before.num_accepted_tokens)


def test_greedy_output_and_logprobs_equal_plain_decoding(plain, spec):
    sp = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, logprobs=3)
    before = spec.spec_decode_stats()
    ref, got = plain.generate(prompts(), sp), spec.generate(prompts(), sp)
    for r, g in zip(ref, got, strict=True):
        a, b = r.outputs[0], g.outputs[0]
        assert b.token_ids == a.token_ids
        assert [lp.token_id for lp in b.logprobs] == b.token_ids
        assert [lp.logprob for lp in b.logprobs] == pytest.approx([lp.logprob for lp in a.logprobs], abs=1e-4)
        assert [lp.rank for lp in b.logprobs] == [lp.rank for lp in a.logprobs]
        assert [[t for t, _ in lp.top] for lp in b.logprobs] == [[t for t, _ in lp.top] for lp in a.logprobs]
    d = delta(spec, before)
    assert d.num_accepted_tokens > 20 and d.num_accepted_tokens < d.num_draft_tokens  # both kinds happened
    assert_idle(spec)


@pytest.mark.parametrize("multi_query", [True, False], ids=["multi-query", "per-span"])
def test_speculative_rows_attended_with_the_decodes_or_per_span_give_the_plain_output(
        plain, spec, monkeypatch, multi_query):
    """On CPU a step's speculative rows and decodes are attended in one multi-query call
    (attention.MultiQueryRows); on CUDA each speculative row is a prefill span (SDPA): here the
    per-span path is forced on CPU (the blocked prefill attention). Both give the plain output."""
    from pdserve.engine import runner
    from pdserve.model import attention

    calls = {"multi_query": 0}
    multi = attention._multi_query_attention

    def counted(*args, **kwargs):
        calls["multi_query"] += 1
        return multi(*args, **kwargs)

    monkeypatch.setattr(attention, "_multi_query_attention", counted)
    monkeypatch.setattr(runner, "multi_query_supported", lambda device: multi_query)
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    before = spec.spec_decode_stats()
    assert tokens(spec, sp) == tokens(plain, sp)
    assert delta(spec, before).num_accepted_tokens > 0
    assert (calls["multi_query"] > 0) == multi_query
    assert_idle(spec)


def oracle(llm: LLM, refs: dict[SamplingParams, list[int]], wrong_at: int | None) -> Callable[[list[Request]], dict]:
    """A proposer that drafts each request's true next tokens (its plain output, by its sampling
    params), as many as the n-gram proposer may, so that speculative rows are long and stops cut
    into them; with `wrong_at`, draft number `wrong_at` of every row is wrong."""
    limit = llm.engine.proposer.max_drafts  # type: ignore[union-attr]

    def propose(reqs: list[Request]) -> dict[str, list[int]]:
        out = {}
        for req in reqs:
            n = len(req.output_token_ids)
            drafts = refs[req.sampling_params][n : n + limit(req)]
            if wrong_at is not None and wrong_at < len(drafts):
                drafts[wrong_at] = (drafts[wrong_at] + 1) % 256
            if drafts:
                out[req.request_id] = drafts
        return out

    return propose


@pytest.mark.parametrize("wrong_at", [None, 2])
def test_stops_inside_speculative_rows_cut_the_output_there(plain, spec, monkeypatch, wrong_at):
    """Rows of up to 4 drafts (all accepted, or two): stop token ids, EOS (with min_tokens bans per
    position), stop strings and max_tokens end the output exactly where plain decoding does, also
    inside a row, and each emitted token's logprobs are its own position's."""
    eos = 258
    greedy = {"temperature": 0.0, "logit_bias": {eos: 0.3}, "logprobs": 2}  # EOS soon, at token 4
    (ref,) = tokens(plain, SamplingParams(max_tokens=40, ignore_eos=True, **greedy), prompts()[:1])
    assert ref.index(eos) == 4
    row = 5 if wrong_at is None else 3  # tokens a row emits (the prefill emits the first token alone)
    decode = spec.tokenizer.decode
    j = next(j for j in range(2, 30) if j % row and ref[j] not in ref[:j]  # a first inside a row
             and "\ufffd" not in decode(ref[j - 1 : j + 1]) and decode(ref[j - 1 : j + 1]).strip())
    text = decode(ref[j - 1 : j + 1])
    sps = [SamplingParams(max_tokens=m, ignore_eos=True, **greedy) for m in (1, 2, 3, 7, 11, 17)]
    sps += [SamplingParams(max_tokens=40, **greedy),  # EOS inside a row
            SamplingParams(max_tokens=40, min_tokens=6, **greedy),  # EOS banned, then other tokens
            SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=[ref[j]], **greedy),
            SamplingParams(max_tokens=40, ignore_eos=True, stop=[text], **greedy),
            # The row with the stop string also reaches max_tokens: "stop" all the same.
            SamplingParams(max_tokens=row * -(-j // row) + 1, ignore_eos=True, stop=[text], **greedy)]
    ps = prompts()[:1] * len(sps)
    want = plain.generate(ps, sps)
    refs = {sp: w.outputs[0].token_ids for sp, w in zip(sps, want, strict=True)}
    monkeypatch.setattr(spec.engine.proposer, "propose", oracle(spec, refs, wrong_at))
    before = spec.spec_decode_stats()
    got = spec.generate(ps, sps)
    for g, w in zip(got, want, strict=True):
        a, b = w.outputs[0], g.outputs[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert [lp.logprob for lp in b.logprobs] == pytest.approx([lp.logprob for lp in a.logprobs], abs=1e-4)
    assert [len(o.outputs[0].token_ids) for o in got[:6]] == [1, 2, 3, 7, 11, 17]
    assert got[6].outputs[0].token_ids == ref[:5] and got[6].outputs[0].finish_reason == "stop"
    assert eos not in got[7].outputs[0].token_ids[:6]
    assert got[8].outputs[0].token_ids == ref[: j + 1]
    assert got[9].outputs[0].finish_reason == "stop" and text not in got[9].outputs[0].text
    assert got[10].outputs[0].token_ids == got[9].outputs[0].token_ids and got[10].outputs[0].finish_reason == "stop"
    d = delta(spec, before)
    assert d.num_drafts > 10 and d.num_accepted_tokens > 0
    assert (d.num_accepted_tokens == d.num_draft_tokens) == (wrong_at is None)
    assert_idle(spec)


def test_penalties_n_choices_and_prefix_cache_hits(plain, spec):
    penalised = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, frequency_penalty=0.01,
                               repetition_penalty=1.01, presence_penalty=0.005)
    assert tokens(spec, penalised) == tokens(plain, penalised)
    for _ in range(2):  # the second time every prompt's blocks are in the prefix cache
        choices = SamplingParams(n=3, max_tokens=24, temperature=0.02, seed=4, ignore_eos=True)
        assert tokens(spec, choices) == tokens(plain, choices)
    assert_idle(spec)


def test_seeded_sampling_is_the_same_with_or_without_speculation_and_a_batch(plain, spec):
    """A seeded request's generator is rewound past rejected rows: the stream advances by emitted
    tokens only, so it samples what plain decoding samples, alone or next to other requests."""
    sp = SamplingParams(max_tokens=40, temperature=0.02, seed=11, ignore_eos=True)
    before = spec.spec_decode_stats()
    batched = tokens(spec, sp)
    alone = [tokens(spec, sp, [p])[0] for p in prompts()]
    assert batched == alone == tokens(plain, sp)
    d = delta(spec, before)
    assert 0 < d.num_accepted_tokens < d.num_draft_tokens
    hot = SamplingParams(max_tokens=24, temperature=1.0, seed=2, top_p=0.9, ignore_eos=True)
    assert tokens(spec, hot) == tokens(spec, hot) == tokens(plain, hot)


def test_a_seeded_chunked_prompt_samples_the_same_alone_or_in_a_busy_batch():
    """Partial prefill chunks draw nothing from a seeded generator: how the budget splits a prompt
    (which other requests' decodes and drafts change) does not change what it samples."""
    llm = LLM(MODEL, dtype="float32", num_kv_blocks=96, max_num_batched_tokens=32, speculative_config=SPEC)
    try:
        g = torch.Generator().manual_seed(0)
        long = torch.randint(0, 256, (96,), generator=g).tolist()
        sp = SamplingParams(max_tokens=20, temperature=1.0, seed=3)
        alone = tokens(llm, sp, [long])
        busy = tokens(llm, [SamplingParams(max_tokens=30, temperature=0.0)] * 6 + [sp], prompts()[:3] * 2 + [long])
        assert busy[-1] == alone[0]
        assert_idle(llm)
    finally:
        llm.close()


def constraints() -> list[StructuredOutputs]:
    """Constraints under which the tiny model's output repeats (drafts get accepted): a regex loop,
    a JSON array of enums, a choice, and a tool_choice "required" grammar (hermes calls)."""
    array = {"type": "array", "items": {"enum": ["ab", "cd", "xyz"]}, "minItems": 24}
    weather = FunctionDef(name="get_weather", parameters={
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]})
    return [StructuredOutputs(regex="(ab|cd)+"), StructuredOutputs(json=json.dumps(array)),
            StructuredOutputs(choice=("abcabcabcabc", "abcabcxyz")),
            StructuredOutputs(grammar=make_tool_parser("hermes").grammar([weather], parallel=True))]


@pytest.mark.parametrize("so", constraints(), ids=["regex", "json", "choice", "tool_calls"])
def test_grammar_requests_speculate_with_the_plain_output(spec, plain, so):
    """Greedy and seeded constrained output is the plain output token for token (an unconstrained
    request in the same batch too), drafts are accepted, and the output obeys the grammar."""
    greedy = SamplingParams(max_tokens=60, temperature=0.0, structured_outputs=so)
    seeded = SamplingParams(max_tokens=60, temperature=0.8, seed=5, structured_outputs=so)
    free = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ps = prompts()[:3]
    before = spec.spec_decode_stats()
    for sps in ([greedy] * 3, [seeded] * 3, [greedy, free, seeded]):
        want, got = plain.generate(ps, sps), spec.generate(ps, sps)
        assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got] == \
            [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in want]
        texts = [o.outputs[0].text for o, sp in zip(got, sps, strict=True) if sp is not free]
        assert so.regex is None or all(set(t) <= set("abcd") for t in texts)
    assert delta(spec, before).num_accepted_tokens > 0
    assert not spec.engine.structured.active  # every matcher forgotten
    assert_idle(spec)


@pytest.mark.parametrize("wrong_at", [None, 1])
def test_a_grammar_that_completes_inside_a_row_ends_the_output_there(plain, spec, monkeypatch, wrong_at):
    """Drafts of the true output run on past its end (and, with `wrong_at`, one per row the grammar
    rejects): they are cut after the draft that completes the grammar (or at the rejected one),
    the row's later positions are dropped, and the output ends there with "stop"."""
    so = StructuredOutputs(choice=("abcabcabcabcab", "abcabcxyz"))
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1, structured_outputs=so)
    (want,) = plain.generate(prompts()[:1], sp)
    ref = want.outputs[0].token_ids
    assert want.outputs[0].text == "abcabcabcabcab" and want.outputs[0].finish_reason == "stop"
    past_end = {sp: ref + [ord("a")] * 8}  # the grammar is complete after ref: these never fit
    monkeypatch.setattr(spec.engine.proposer, "propose", oracle(spec, past_end, wrong_at))
    before = spec.spec_decode_stats()
    (got,) = spec.generate(prompts()[:1], sp)
    a, b = want.outputs[0], got.outputs[0]
    assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
    assert [lp.logprob for lp in b.logprobs] == pytest.approx([lp.logprob for lp in a.logprobs], abs=1e-4)
    d = delta(spec, before)
    assert d.num_accepted_tokens == d.num_draft_tokens > 0  # cut drafts are never scheduled
    if wrong_at is None:  # 1 token from the prefill, rows of 4 + 1, 4 + 1, then 3 (the last completes)
        assert (len(ref), d.num_drafts, d.num_accepted_tokens) == (14, 3, 11)
    else:
        assert d.num_draft_tokens == d.num_drafts
    assert_idle(spec)


def test_the_matcher_is_where_plain_decoding_would_have_it_after_each_step(spec):
    """Step by step: the engine's matcher of a speculating constrained request allows, next, what
    a matcher that consumed only the emitted tokens allows."""
    eng = spec.engine
    so = constraints()[1]
    ref = StructuredOutputManager(eng.tokenizer, eng.model_config.vocab_size, tuple(eng.loaded.eos_token_ids))
    req = eng.add_request("m", prompts()[0], SamplingParams(max_tokens=60, temperature=0.0, structured_outputs=so))
    ref.add("m", so)
    before = spec.spec_decode_stats()
    consumed = 0
    while not req.is_finished:
        eng.step()
        eng.scheduler.check_integrity()
        for token in req.output_token_ids[consumed:]:
            ref.accept("m", token)
        consumed = len(req.output_token_ids)
        if not req.is_finished:
            cpu = torch.device("cpu")
            assert torch.equal(eng.structured.bitmask(["m"], cpu), ref.bitmask(["m"], cpu))
    assert delta(spec, before).num_accepted_tokens > 10
    assert_idle(spec)


def test_preemption_and_aborts_keep_the_pool_consistent(plain):
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    small = LLM(MODEL, dtype="float32", num_kv_blocks=12, max_num_batched_tokens=64, speculative_config=SPEC)
    try:
        assert tokens(small, sp) == tokens(plain, sp)
        eng = small.engine
        assert eng.scheduler.num_preemptions > 0 and eng.spec_stats.num_accepted_tokens > 0
        assert_idle(small)
        for i, p in enumerate(prompts() * 2):
            eng.add_request(f"a{i}", p, sp)
        for step in range(30):
            eng.step()
            eng.scheduler.check_integrity()
            if step % 4 == 3:
                eng.abort_request(f"a{step // 4}")
        eng.run_until_done()
        assert_idle(small)
    finally:
        small.close()


def engine(role: str = "standalone", speculative: SpeculativeConfig | None = None) -> AsyncEngine:
    return AsyncEngine(LLMEngine(EngineConfig(
        model=MODEL, dtype="float32", cache=CacheConfig(num_kv_blocks=64),
        scheduler=SchedulerConfig(max_num_batched_tokens=32),
        kv_transfer=KVTransferConfig(role=role, kv_transport="shm"),  # type: ignore[arg-type]
        speculative=speculative,
    )))


def test_a_decode_instance_speculates_on_kv_from_a_prefill_that_does_not():
    cfg = SpeculativeConfig.from_dict(SPEC)
    s, p, d = engine(), engine("prefill", cfg), engine("decode", cfg)
    try:
        assert p.engine.proposer is None and d.engine.proposer is not None
        sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)

        async def main() -> None:
            for i, prompt in enumerate(prompts()):
                ref, _ = await run(s, f"r{i}", prompt, sp=sp)
                got, out = await disagg(p, d, f"r{i}", prompt, "read", sp)
                assert out.error is None and got == ref

        asyncio.run(main())
        assert d.engine.spec_stats.num_accepted_tokens > 0
        assert p.engine.stats().spec_decode is None
        wait_blocks_free(s, p, d)
    finally:
        close(s, p, d)


def test_lora_rows_speculate_with_their_adapter(tmp_path):
    pytest.importorskip("peft")
    from pdserve import LoRARequest
    from tests.lora_models import make_base_and_adapters

    make_base_and_adapters(tmp_path)
    loras = [None, LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))]
    ps = [[(7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate((9, 37, 20))]
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    outs = []
    for speculative in (None, SPEC):
        llm = LLM(str(tmp_path / "base"), dtype="float32", num_kv_blocks=64, enable_lora=True,
                  speculative_config=speculative)
        outs.append([o.outputs[0].token_ids for o in llm.generate(ps, sp, lora_request=loras)])
        if speculative is not None:
            assert llm.engine.spec_stats.num_accepted_tokens > 0
            assert_idle(llm)
        llm.close()
    assert outs[0] == outs[1]
