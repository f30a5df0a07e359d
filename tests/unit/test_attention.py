"""The attention masks of attention.py (causal, sliding window, soft-cap) against a dense reference:
two GQA sequences over the paged cache, one prefilled in several chunks (with cached tokens before
them) and both decoded, in mixed batches; and speculative rows (several queries of a decoding
sequence) attended with the decodes as multi-query rows."""

from __future__ import annotations

import pytest
import torch

from pdserve.model import attention
from pdserve.model.attention import MultiQueryRows, QueryRow, _prefill_attention_sdpa, paged_attention
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


# Steps with speculative rows ("spec", start, end: the queries at positions start .. end - 1, a
# decoding sequence's last token and its drafts), mixed with decodes and prefill chunks: rows of
# 5, 1 and 2 queries; a row that starts at position 4 (shorter context than the slots); a prefill
# chunk in a multi-query step.
MQ_STEPS = [
    {"a": ("prefill", 0, 40), "b": ("prefill", 0, 3), "c": ("prefill", 0, 17)},
    {"a": ("spec", 40, 45), "b": ("decode", 3), "c": ("spec", 17, 19)},
    {"a": ("decode", 45), "b": ("spec", 4, 9), "c": ("prefill", 19, 30)},
    {"a": ("spec", 46, 51), "b": ("spec", 9, 14), "c": ("decode", 30)},
]
MQ_LENGTHS = {"a": 51, "b": 14, "c": 31}


def _multi_query_step_meta(step: dict, blocks: dict[str, list[int]]):
    """The flat batch of one step as the runner builds it on CPU: decodes first, then the spans
    (speculative rows and prefill chunks) in step order; decodes and speculative rows attended
    together (MultiQueryRows). And each sequence's rows."""
    decodes = [(seq, what) for seq, what in step.items() if what[0] == "decode"]
    spans = [(seq, what) for seq, what in step.items() if what[0] != "decode"]
    meta, _ = make_meta(
        [(blocks[seq], what[1]) for seq, what in decodes],
        [(blocks[seq], what[1], what[2] - what[1]) for seq, what in spans],
    )
    rows = [(seq, what[1], what[1] + 1) for seq, what in decodes] + [(seq, what[1], what[2]) for seq, what in spans]
    query_rows = [QueryRow(i, 1, what[1] + 1, blocks[seq]) for i, (seq, what) in enumerate(decodes)]
    spec = [i for i, (_, what) in enumerate(spans) if what[0] == "spec"]
    for i in spec:
        span, seq = meta.prefills[i], spans[i][0]
        query_rows.append(QueryRow(span.q_start, span.q_len, span.num_cached + span.q_len, blocks[seq]))
    if spec:  # as the runner: only steps with speculative rows
        meta.multi_query = MultiQueryRows.of(query_rows, spec, torch.device("cpu"))
    return meta, rows


@pytest.mark.parametrize(
    ("window", "softcap"), [(None, None), (1, None), (3, None), (23, None), (3, 2.0), (None, 2.0)]
)
def test_multi_query_rows_match_dense_reference(window, softcap):
    """Speculative rows attended together with the decodes (one gather + batched matmul, a causal
    mask per query slot) against the dense reference, windows cutting into the rows' own queries;
    and the same steps with each speculative row as a prefill span (multi_query unset: CUDA's way)."""
    g = torch.Generator().manual_seed(1)
    qkv = {
        seq: tuple(torch.randn(n, heads, HD, generator=g) for heads in (KVH * GROUP, KVH, KVH))
        for seq, n in MQ_LENGTHS.items()
    }
    order = torch.randperm(16, generator=g).tolist()
    blocks = {"a": order[:4], "b": order[4:5], "c": order[5:7]}
    kv_cache = torch.zeros(16, 2, KVH, BS, HD)
    got = {seq: torch.full((n, KVH * GROUP, HD), float("nan")) for seq, n in MQ_LENGTHS.items()}
    for step in MQ_STEPS:
        meta, rows = _multi_query_step_meta(step, blocks)
        q, k, v = (torch.cat([qkv[seq][i][s:e] for seq, s, e in rows]) for i in range(3))
        out = paged_attention(q, k, v, kv_cache, meta, SCALE, softcap, window)
        meta.multi_query = None
        per_span = paged_attention(q, k, v, kv_cache, meta, SCALE, softcap, window)
        torch.testing.assert_close(out, per_span, atol=1e-5, rtol=1e-5)
        offset = 0
        for seq, s, e in rows:
            got[seq][s:e] = out[offset : offset + e - s]
            offset += e - s
    for seq, (q, k, v) in qkv.items():
        torch.testing.assert_close(got[seq], dense_attention(q, k, v, softcap, window), atol=1e-5, rtol=1e-5)


def test_multi_query_slots_right_align_each_row_and_repeat_its_first_query():
    """Rows of 1, 5 and 2 queries in 5 slots: the pads hold the row's first query and position,
    and only the real queries are written back, to their flat rows."""
    rows = [QueryRow(0, 1, 7, [3]), QueryRow(1, 5, 20, [1, 2]), QueryRow(6, 2, 10, [4])]
    mq = MultiQueryRows.of(rows, [0, 1], torch.device("cpu"))
    assert mq.num_slots == 5 and mq.span_indices == frozenset({0, 1})
    assert mq.q_index.view(3, 5).tolist() == [[0] * 5, [1, 2, 3, 4, 5], [6, 6, 6, 6, 7]]
    assert mq.q_positions.tolist() == [[6] * 5, [15, 16, 17, 18, 19], [8, 8, 8, 8, 9]]
    assert mq.out_slots.tolist() == [4, 5, 6, 7, 8, 9, 13, 14]
    assert mq.out_rows.tolist() == list(range(8))
    assert mq.block_tables.tolist() == [[3, 0], [1, 2], [4, 0]]
    bias = mq.bias(BS, window=3)  # [S, 1, Q, L]
    assert bias.shape == (3, 1, 5, 2 * BS)
    seen = (bias[1, 0] == 0).nonzero().tolist()  # slot 4 (position 19) sees 17, 18, 19
    assert [k for s, k in seen if s == 4] == [17, 18, 19] and [k for s, k in seen if s == 0] == [13, 14, 15]
