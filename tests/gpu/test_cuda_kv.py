"""GPU-only: the engine on CUDA matches CPU, and cuda_ipc moves KV between two engines on one GPU.

Skipped without a CUDA device (CI is CPU-only); run by benchmarks/gpu_check.py on a GPU machine.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from pdserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_greedy_matches_cpu():
    prompts = [[(3 * i + j) % 250 for j in range(n)] for i, n in enumerate((5, 40, 100))]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    cpu = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64)
    gpu = LLM("dummy:qwen3-tiny", device="cuda", dtype="float32", num_kv_blocks=64)
    a = [o.outputs[0].token_ids for o in cpu.generate(prompts, sp)]
    b = [o.outputs[0].token_ids for o in gpu.generate(prompts, sp)]
    assert a == b


def test_cuda_logprobs_and_penalties_match_cpu():
    """Logprobs (read after the step's one sync) and penalties (count tensors built on the device)
    on CUDA, with graphs: the same tokens and logprobs as on CPU in fp32."""
    prompts = [[(3 * i + j) % 250 for j in range(n)] for i, n in enumerate((5, 40, 100))]
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0, presence_penalty=1.5,
                       frequency_penalty=0.5),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=3.0),
    ]
    cpu = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64)
    gpu = LLM("dummy:qwen3-tiny", device="cuda", dtype="float32", num_kv_blocks=64)
    for a, b in zip(cpu.generate(prompts, params), gpu.generate(prompts, params), strict=True):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids
        if x.logprobs is not None:
            assert [lp.logprob for lp in y.logprobs] == pytest.approx([lp.logprob for lp in x.logprobs], abs=1e-3)
            assert [[t for t, _ in lp.top] for lp in y.logprobs] == [[t for t, _ in lp.top] for lp in x.logprobs]


def test_cuda_prefix_cache_and_structured_outputs_match_cpu():
    """Prefix-cache hits (prefill over cached blocks on the device) and grammar masks (pinned
    host bitmask, copied with the step's inputs; applied after a graph replay): the same as CPU."""
    import json

    from pdserve.engine.sampling_params import StructuredOutputs

    shared = [(7 * j) % 250 for j in range(70)]
    prompts = [shared + [i, i + 1] for i in range(3)]
    schema = {"type": "object", "required": ["a"], "additionalProperties": False,
              "properties": {"a": {"type": "boolean"}}}
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, structured_outputs=StructuredOutputs(json=json.dumps(schema))),
        SamplingParams(max_tokens=20, temperature=0.0, structured_outputs=StructuredOutputs(regex="[a-d]{5}")),
    ]
    cpu = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64)
    gpu = LLM("dummy:qwen3-tiny", device="cuda", dtype="float32", num_kv_blocks=64)
    for llm in (cpu, gpu):
        llm.generate([shared + [9]], SamplingParams(max_tokens=2))  # the shared prefix is cached now
    a, b = cpu.generate(prompts, params), gpu.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.num_cached_tokens for o in b] == [64, 64, 64]
    assert set(json.loads(b[1].outputs[0].text)) == {"a"} and len(b[2].outputs[0].text) == 5


@pytest.mark.parametrize("mode", ["read", "write"])
def test_cuda_ipc_disagg_equals_standalone(mode):
    from tests.unit.test_kv_transfer import close, disagg, make_on, prompts, run

    s = make_on("cuda", "dummy:qwen3-tiny")
    p = make_on("cuda", "dummy:qwen3-tiny", "prefill", mode, "cuda_ipc")
    d = make_on("cuda", "dummy:qwen3-tiny", "decode", mode, "cuda_ipc")
    try:
        async def main():
            for i, prompt in enumerate(prompts()):
                ref, _ = await run(s, f"r{i}", prompt)
                got, out = await disagg(p, d, f"r{i}", prompt, mode)
                assert out.error is None and got == ref

        asyncio.run(main())
    finally:
        close(s, p, d)
