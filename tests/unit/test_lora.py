"""Multi-LoRA: adapters written by PEFT give PEFT's outputs, per row of a mixed batch, fused or not;
the prefix cache never mixes adapters; bad adapters are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from pdserve import LLM, LoRARequest, SamplingParams
from pdserve.config import LoRAConfig
from pdserve.engine.lora import LoRAManager
from pdserve.model.decoder import fuse_projections_
from pdserve.model.loader import load_model
from tests.lora_models import make_base_and_adapters
from tests.unit.paged import assert_close, make_meta, new_cache, run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPTS = [[(7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate((9, 37, 20, 37))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return root, make_base_and_adapters(root)


def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_mixed_batch_matches_peft(setup):
    root, refs = setup
    loras = {"a": LoRARequest("a", 1, str(root / "a")), "b": LoRARequest("b", 2, str(root / "b"))}
    which = [None, "a", "b", "a"]
    llm = LLM(str(root / "base"), dtype="float32", num_kv_blocks=64, enable_lora=True)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, lora_request=[loras[w] if w else None for w in which])
    for prompt, w, out in zip(PROMPTS, which, outs, strict=True):
        assert out.outputs[0].token_ids == _greedy(refs[w], prompt, 6), w
    # Different adapters really differ on these prompts (else the test would prove nothing).
    assert len({tuple(_greedy(refs[w], PROMPTS[1], 6)) for w in (None, "a", "b")}) == 3
    llm.engine.block_pool.check_integrity()
    llm.close()


def test_prefix_cache_is_per_adapter(setup):
    root, _ = setup
    llm = LLM(str(root / "base"), dtype="float32", num_kv_blocks=64, enable_lora=True)
    sp = SamplingParams(max_tokens=2, temperature=0)
    prompt = list(range(40))  # two full blocks
    a = LoRARequest("a", 1, str(root / "a"))
    assert llm.generate([prompt], sp)[0].num_cached_tokens == 0
    assert llm.generate([prompt], sp, lora_request=a)[0].num_cached_tokens == 0  # not the base's KV
    assert llm.generate([prompt], sp, lora_request=a)[0].num_cached_tokens == 32
    assert llm.generate([prompt], sp)[0].num_cached_tokens == 32
    llm.close()


def test_fused_projections_carry_every_slice(setup):
    """q/k/v and gate/up fused into one linear (CUDA, packed CPU): the same logits as unfused."""
    root, _ = setup
    logits = []
    for fuse in (False, True):
        lm = load_model(str(root / "base"), torch.float32, "cpu")
        if fuse:
            fuse_projections_(lm.module)
        manager = LoRAManager(lm.module, LoRAConfig(enable_lora=True), torch.float32, torch.device("cpu"))
        for i, name in ((1, "a"), (2, "b")):
            lora = LoRARequest(name, i, str(root / name))
            manager.install(lora, manager.read(name, lora.lora_path), set())
        # Two prefills in one flat batch: rows 0-19 with adapter a, rows 20-36 with b.
        meta, pos = make_meta([], [([5, 2, 7], 0, 20), ([1, 6], 0, 17)])
        manager.state.groups = [(1, torch.arange(0, 20)), (2, torch.arange(20, 37))]
        logits.append(run(lm, torch.tensor(PROMPTS[1]), new_cache(lm), meta, pos))
    assert_close(logits[0], logits[1])


def test_eviction_and_errors(setup, tmp_path):
    root, _ = setup
    llm = LLM(str(root / "base"), dtype="float32", num_kv_blocks=64, enable_lora=True, max_loras=1, max_lora_rank=4)
    sp = SamplingParams(max_tokens=2, temperature=0)
    b = LoRARequest("b", 2, str(root / "b"))
    llm.generate([PROMPTS[0]], sp, lora_request=b)
    with pytest.raises(ValueError, match="rank 8, above --max-lora-rank 4"):
        llm.generate([PROMPTS[0]], sp, lora_request=LoRARequest("a", 1, str(root / "a")))
    # max_loras=1: another adapter evicts the idle one.
    b2 = LoRARequest("b2", 3, str(root / "b"))
    llm.generate([PROMPTS[0]], sp, lora_request=b2)
    assert [lo.lora_name for lo in llm.engine.list_loras()] == ["b2"]
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate([PROMPTS[0]], sp, lora_request=LoRARequest("x", 9, str(tmp_path)))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (root / "b").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        llm.generate([PROMPTS[0]], sp, lora_request=LoRARequest("bad", 10, str(bad)))
    llm.close()
    plain = LLM(str(root / "base"), dtype="float32", num_kv_blocks=64)
    with pytest.raises(ValueError, match="--enable-lora"):
        plain.generate([PROMPTS[0]], sp, lora_request=b)
    plain.close()
