"""GPU-only: freeing KV blocks that slid out of the window (every layer windowed) keeps CUDA's tokens.

Freed slots of a block table name the pool's padding block, which is also the CUDA-graph padding
rows' scratch: the Triton decode kernel (which starts at the window), SDPA's windowed prefill and the
graph replays must give the tokens CPU gives with freeing off. Skipped without a CUDA device; run by
benchmarks/gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODEL = "dummy:mistral-tiny"  # a 16-token window on both layers
PROMPTS = [[(5 * i + j) % 250 for j in range(n)] for i, n in enumerate((40, 70))]
SP = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)


def _tokens(device: str, num_kv_blocks: int, freeing: bool) -> tuple[list[list[int]], int]:
    """Greedy tokens of PROMPTS, and the blocks freed early."""
    llm = LLM(MODEL, device=device, dtype="float32", num_kv_blocks=num_kv_blocks, max_num_batched_tokens=24)
    if not freeing:
        llm.engine.scheduler.reclaimer = None
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP)]
    eng = llm.engine
    eng.scheduler.check_integrity()
    assert eng.block_pool.num_free == eng.block_pool.num_usable
    return out, eng.stats().num_window_freed_blocks


def test_cuda_window_freeing_matches_cpu_without_it():
    ref, _ = _tokens("cpu", 64, freeing=False)
    # 8 usable blocks of 16: a request holds at most ceil((16 + 24) / 16) + 1 = 4 at once, 8 without freeing.
    got, freed = _tokens("cuda", 9, freeing=True)
    assert got == ref and freed > 0
