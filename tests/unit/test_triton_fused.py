"""The fused Triton kernels (pdserve/model/triton_fused.py) against the torch ops they replace,
under Triton's CPU interpreter (TRITON_INTERPRET=1, when Triton is installed; the GPU run checks
them on CUDA through tests/gpu). Shapes: Qwen3-style q/k norms, Llama-style none, Gemma's
(1 + weight) norms, a head dim whose half is no power of two, and paged-cache writes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

_CHECK = textwrap.dedent(
    """
    import sys

    import torch
    import torch.nn.functional as F

    from pdserve.model import triton_fused as tf
    from pdserve.model.attention import AttentionMetadata, write_kv
    from pdserve.model.decoder import RMSNorm
    from pdserve.model.rope import RotaryEmbedding, apply_rope

    torch.manual_seed(0)
    dev = torch.device(sys.argv[1])  # cpu: under TRITON_INTERPRET=1; cuda: compiled
    exact_bf16 = dev.type == "cuda"  # the interpreter rounds to bfloat16 by truncation, a GPU to nearest


    def close(got, ref, dtype, what):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        err = (got.float() - ref.float()).abs().max().item()
        assert err <= tol * max(1.0, ref.float().abs().max().item()), (what, dtype, err)


    for dtype in (torch.float32, torch.bfloat16):
        for unit in (False, True):
            norm = RMSNorm(96, 1e-6, unit)
            with torch.no_grad():
                norm.weight.normal_()
            norm = norm.to(dev, dtype)
            x, d = torch.randn(5, 96, dtype=dtype, device=dev), torch.randn(5, 96, dtype=dtype, device=dev)
            total, y = tf.add_rms_norm(x, d, norm.weight, norm.eps, unit)
            if dtype == torch.float32 or exact_bf16:
                assert torch.equal(total, x + d), "the residual sum is the dtype's add"
            close(total, x + d, dtype, "residual sum")
            close(y, norm(x + d), dtype, ("add_rms_norm", unit))
            total, y = tf.add_rms_norm(x, None, norm.weight, norm.eps, unit)
            assert total is x or torch.equal(total, x)
            close(y, norm(x), dtype, ("rms_norm", unit))

        g_u = torch.randn(3, 2 * 300, dtype=dtype, device=dev)
        g, u = g_u.chunk(2, dim=-1)
        close(tf.silu_mul(g_u), F.silu(g) * u, dtype, "silu_mul")

        # (q heads, kv heads, head dim, q/k norm, unit offset)
        for h, kvh, hd, with_norm, unit in [(4, 2, 32, True, False), (2, 2, 16, False, False),
                                            (4, 1, 48, True, True)]:
            t, bs, nb = 6, 4, 5
            qkv = torch.randn(t, (h + 2 * kvh) * hd, dtype=dtype, device=dev)
            positions = torch.tensor([0, 1, 2, 7, 8, 30], device=dev)
            cos, sin = RotaryEmbedding(hd, 64, 10000.0)(positions, dtype)
            qn, kn = RMSNorm(hd, 1e-6, unit), RMSNorm(hd, 1e-6, unit)
            with torch.no_grad():
                qn.weight.normal_()
                kn.weight.normal_()
            qn, kn = qn.to(dev, dtype), kn.to(dev, dtype)
            slots = torch.tensor([3, 9, 0, 17, 12, 6], device=dev)
            none = torch.zeros(0, dtype=torch.long, device=dev)
            meta = AttentionMetadata(bs, slots, 0, none[:, None], none)

            q, k, v = qkv.split([h * hd, kvh * hd, kvh * hd], dim=-1)
            q, k, v = q.unflatten(-1, (h, hd)), k.unflatten(-1, (kvh, hd)), v.unflatten(-1, (kvh, hd))
            if with_norm:
                q, k = qn(q), kn(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            ref_kv = torch.zeros(nb, 2, kvh, bs, hd, dtype=dtype, device=dev)
            write_kv(ref_kv, k, v, meta)

            got, kv = qkv.clone(), torch.zeros(nb, 2, kvh, bs, hd, dtype=dtype, device=dev)
            norms = (qn.weight, kn.weight) if with_norm else None
            assert tf.qk_norm_rope_supported(got, hd, cos.shape[-1])
            tf.qk_norm_rope_(got, h, kvh, cos, sin, norms, 1e-6, unit, kv, slots)
            gq, gk, gv = got.split([h * hd, kvh * hd, kvh * hd], dim=-1)
            what = ("qk_norm_rope", h, kvh, hd, with_norm, unit)
            close(gq.unflatten(-1, (h, hd)), q, dtype, what)
            close(gk.unflatten(-1, (kvh, hd)), k, dtype, what)
            assert torch.equal(gv, qkv[:, (h + kvh) * hd:]), "v is left as it was"
            close(kv, ref_kv, dtype, what + ("cache",))
            # Without a cache: q and k only, and nothing else is touched.
            again = qkv.clone()
            tf.qk_norm_rope_(again, h, kvh, cos, sin, norms, 1e-6, unit, None, None)
            assert torch.equal(again, got)

    # The decoder's wiring: the engine's greedy tokens with the kernels equal the torch path's,
    # float32, q/k/v and gate/up fused (as the CUDA engine fuses them); mixed steps (prefills beside
    # decodes) and decode-only ones, prefix caching off so every prompt computes.
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.llm import LLM
    from pdserve.model.decoder import fuse_projections_

    llm = LLM("dummy:qwen3-tiny", device=str(dev), dtype="float32", num_kv_blocks=64, enable_prefix_caching=False,
              enforce_eager=True)  # a captured graph would keep the kernels it captured
    fuse_projections_(llm.engine.loaded.module)
    prompts = [{"prompt_token_ids": list(range(3 + 7 * i, 40 + 11 * i))} for i in range(3)]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tf.available = lambda x: False
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    tf.available = lambda x: True
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert got == ref, (got, ref)
    print("ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
def test_fused_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _CHECK, "cpu"], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
