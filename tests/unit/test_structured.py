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
