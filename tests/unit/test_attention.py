"""The attention masks of attention.py (causal, sliding window, soft-cap) against a dense reference:
two GQA sequences over the paged cache, one prefilled in several chunks (with cached tokens before
them) and both decoded, in mixed batches."""

from __future__ import annotations

import pytest
import torch

from pdserve.model import attention
from pdserve.model.attention import _prefill_attention_sdpa, paged_attention
from tests.unit.paged import BS, make_meta

KVH, GROUP, HD = 2, 3, 16
SCALE = HD**-0.5
# Per step, what each sequence runs: ("prefill", start, end) or ("decode", position).
STEPS = [
    {"a": ("prefill", 0, 13), "b": ("prefill", 0, 30)},
    {"a": ("prefill", 13, 53), "b": ("decode", 30)},
    {"a": ("prefill", 53, 90), "b": ("decode", 31)},
    *({"a": ("decode", 90 + i), "b": ("decode", 32 + i)} for i in range(4)),
]
LENGTHS = {"a": 94, "b": 36}


def dense_attention(q, k, v, softcap: float | None, window: int | None) -> torch.Tensor:
    """Every query of one sequence against all its keys: [L, H, hd], transformers' sliding-window
    mask (key j visible from query i when i - window < j <= i)."""
    n = q.shape[0]
    k, v = k.repeat_interleave(GROUP, dim=1), v.repeat_interleave(GROUP, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = (j <= i) & ((j > i - window) if window is not None else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def _step_meta(step: dict, blocks: dict[str, list[int]]):
    """The flat batch of one step: decodes first, then prefill chunks; and each sequence's rows."""
    decodes = [(seq, what) for seq, what in step.items() if what[0] == "decode"]
    prefills = [(seq, what) for seq, what in step.items() if what[0] == "prefill"]
    meta, _ = make_meta(
        [(blocks[seq], what[1]) for seq, what in decodes],
        [(blocks[seq], what[1], what[2] - what[1]) for seq, what in prefills],
    )
    rows = [(seq, what[1], what[1] + 1) for seq, what in decodes] + [(seq, what[1], what[2]) for seq, what in prefills]
    return meta, rows


@pytest.mark.parametrize(
    ("window", "softcap"), [(None, None), (1, None), (5, None), (23, None), (200, None), (5, 2.0), (None, 2.0)]
)
def test_paged_attention_matches_dense_reference(window, softcap, monkeypatch):
    """Query blocks of 8, so blocks skip the keys before their window; chunks with 13 to 53 cached
    tokens, whose windows start in later blocks of the sequence."""
    monkeypatch.setattr(attention, "_QUERY_BLOCK", 8)
    g = torch.Generator().manual_seed(0)
    qkv = {
        seq: (
            torch.randn(n, KVH * GROUP, HD, generator=g),
            torch.randn(n, KVH, HD, generator=g),
            torch.randn(n, KVH, HD, generator=g),
        )
        for seq, n in LENGTHS.items()
    }
    order = torch.randperm(16, generator=g).tolist()
    blocks = {"a": order[:6], "b": order[6:9]}
    kv_cache = torch.zeros(16, 2, KVH, BS, HD)
    got = {seq: torch.full((n, KVH * GROUP, HD), float("nan")) for seq, n in LENGTHS.items()}
    for step in STEPS:
        meta, rows = _step_meta(step, blocks)
        q, k, v = (torch.cat([qkv[seq][i][s:e] for seq, s, e in rows]) for i in range(3))
        out = paged_attention(q, k, v, kv_cache, meta, SCALE, softcap, window)
        offset = 0
        for seq, s, e in rows:
            got[seq][s:e] = out[offset : offset + e - s]
            offset += e - s
        if softcap is None:  # the CUDA prefill (SDPA) on the same chunks, its K/V already in the cache
            for span in meta.prefills:
                s, e = span.q_start, span.q_start + span.q_len
                sdpa = _prefill_attention_sdpa(q[s:e], k[s:e], v[s:e], kv_cache, span, SCALE, window)
                torch.testing.assert_close(sdpa, out[s:e], atol=1e-5, rtol=1e-5)
    for seq, (q, k, v) in qkv.items():
        torch.testing.assert_close(got[seq], dense_attention(q, k, v, softcap, window), atol=1e-5, rtol=1e-5)


def test_window_mask_is_transformers_mask():
    """_hidden_keys is the complement of transformers' sliding-window causal mask."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    q_pos, k_pos = torch.arange(20, 32), torch.arange(32)
    for window in (1, 4, 9):
        theirs = masking_utils.sliding_window_causal_mask_function(window)(0, 0, q_pos[:, None], k_pos[None, :])
        assert torch.equal(~attention._hidden_keys(q_pos, k_pos, window), theirs)
    assert torch.equal(~attention._hidden_keys(q_pos, k_pos, None), k_pos[None, :] <= q_pos[:, None])
