"""Structured outputs: grammars from each kind of constraint, the bitmask applied to logits, and
the engine generating under a constraint (random weights, sampled) with matchers forgotten after."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.sampling_params import StructuredOutputs
from pdserve.engine.structured import StructuredOutputManager, apply_bitmask_
from pdserve.model.tokenizer import Tokenizer

VOCAB = 512


@pytest.fixture(scope="module")
def manager() -> StructuredOutputManager:
    tok = Tokenizer.byte_level(VOCAB)
    return StructuredOutputManager(tok, VOCAB, tok.eos_token_ids)


def test_bitmask_bits_map_to_token_ids() -> None:
    logits = torch.zeros(2, 70)
    mask = torch.zeros(2, 2, dtype=torch.int32)
    mask[0, 0] = 1 - (1 << 31)  # ids 0 and 31 (bit 31 is the sign bit)
    mask[1, 1] = 1 << 5  # id 37
    apply_bitmask_(logits, mask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 31]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [37]  # 64..69: beyond the mask, banned


def test_constraint_kinds(manager: StructuredOutputManager) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=("b",))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(ValueError, match="at least one"):
        StructuredOutputs(choice=())
    for bad in (StructuredOutputs(regex="("), StructuredOutputs(json="[1]"), StructuredOutputs(json="{x"),
                StructuredOutputs(grammar="start: ("), StructuredOutputs(grammar="root ::= ((")):
        with pytest.raises(ValueError, match="invalid structured output"):
            manager.validate(bad)


def test_matcher_allows_only_the_grammar_and_stops(manager: StructuredOutputManager) -> None:
    manager.add("r", StructuredOutputs(choice=("ab", "ac")))
    mask = manager.bitmask(["r", None], torch.device("cpu"))
    assert mask is not None
    logits = torch.zeros(2, VOCAB)
    apply_bitmask_(logits, mask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [ord("a")]
    assert torch.isfinite(logits[1]).all()  # the unconstrained row
    assert not manager.accept("r", ord("a"))
    assert manager.accept("r", ord("c"))  # "ac" is complete: the request should end
    manager.forget("r")
    assert manager.bitmask(["r"], torch.device("cpu")) is None and not manager.accept("r", 1)


@pytest.mark.parametrize(("so", "check"), [
    (StructuredOutputs(json=json.dumps({
        "type": "object", "additionalProperties": False, "required": ["n", "tags"],
        "properties": {"n": {"type": "integer"}, "tags": {"type": "array", "maxItems": 2,
                                                          "items": {"enum": ["x", "y"]}}}})),
     lambda t: set(json.loads(t)) == {"n", "tags"}),
    (StructuredOutputs(regex=r"[0-9]{3}(-[a-z]{2})?"), lambda t: re.fullmatch(r"[0-9]{3}(-[a-z]{2})?", t)),
    (StructuredOutputs(choice=("alpha", "beta")), lambda t: t in ("alpha", "beta")),
])
def test_engine_samples_under_the_constraint(so: StructuredOutputs, check) -> None:
    llm = LLM("dummy:qwen3-tiny", num_kv_blocks=64)
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, structured_outputs=so) for s in range(4)]
    plain = SamplingParams(max_tokens=5, temperature=1.0, seed=1)  # in the same batches, unconstrained
    outs = llm.generate(["one", "two", "three", "four", "five"], params + [plain])
    for o in outs[:4]:
        assert o.outputs[0].finish_reason == "stop" and check(o.outputs[0].text), o.outputs[0].text
    assert len(outs[4].outputs[0].token_ids) == 5
    assert not llm.engine.structured._matchers  # every matcher forgotten
    llm.engine.scheduler.check_integrity()
    llm.close()


def _mask_of(manager: StructuredOutputManager, rid: str) -> list[int]:
    mask = manager.bitmask([rid], torch.device("cpu"))
    assert mask is not None
    return mask[0].tolist()


@pytest.mark.parametrize("so", [
    StructuredOutputs(regex="(ab|cd)+e"),
    StructuredOutputs(json=json.dumps({"type": "array", "items": {"enum": ["ab", "cd"]}, "maxItems": 6})),
])
def test_speculative_masks_follow_the_drafts_and_leave_the_matcher_as_it_was(
        manager: StructuredOutputManager, so: StructuredOutputs) -> None:
    """At every point of a valid output: drafts are cut where the grammar rejects one and after the
    one that completes it; the j-th mask row of a speculative row is the mask of a matcher that
    consumed the drafts before it; and afterwards the matcher is token for token where one that
    consumed only the emitted tokens is (same mask, same completion when they are accepted)."""
    text = "abcdabe" if so.regex is not None else '["ab","cd","ab","cd","ab","cd"]'
    out = [ord(c) for c in text]
    junk = [ord("z")] * 3
    manager.add("spec", so)
    for p in range(len(out)):
        rest = out[p:]
        assert manager.valid_drafts("spec", rest + junk) == rest  # complete at the end: junk cut
        assert manager.valid_drafts("spec", [ord("z"), *rest]) == []
        drafts = rest[:4]
        rows = [None, *["spec"] * (1 + len(drafts)), None]
        mask = manager.bitmask(rows, torch.device("cpu"), {"spec": drafts})
        assert mask is not None
        assert mask[0].tolist() == mask[-1].tolist() == [-1] * mask.shape[1]  # the unconstrained rows
        for j in range(len(drafts) + 1):
            manager.add("ref", so)
            for t in out[:p] + drafts[:j]:
                manager.accept("ref", t)
            assert mask[1 + j].tolist() == _mask_of(manager, "ref"), (p, j)
            manager.forget("ref")
        manager.add("ref", so)
        for t in out[:p]:
            manager.accept("ref", t)
        assert _mask_of(manager, "spec") == _mask_of(manager, "ref")
        assert manager.accept("spec", out[p]) == manager.accept("ref", out[p]) == (p == len(out) - 1)
        manager.forget("ref")
    manager.forget("spec")


def test_unconstrained_drafts_are_kept(manager: StructuredOutputManager) -> None:
    assert manager.valid_drafts("nobody", [1, 2, 3]) == [1, 2, 3]
    assert manager.bitmask([None, "nobody", "nobody"], torch.device("cpu"), {"nobody": [1, 2]}) is None
