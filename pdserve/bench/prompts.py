"""The requests of one run: random token ids, or a sample of a dataset file, in the form the
endpoint takes (ids or text for /v1/completions, text for /v1/chat/completions).

Sampling follows vLLM's `vllm bench serve` (vllm/benchmarks/datasets: ShareGPTDataset,
CustomDataset, is_valid_sequence), so that a seed picks the same prompts:

- A file's entries are shuffled with Python's `random` seeded by `--seed` (unless
  `--disable-shuffle`) and taken in that order.
- ShareGPT: the prompt's and the reply's tokens are counted (with the tokenizer's special tokens, as
  `tokenizer(text)` does); the output length is the reply's count, or `--sharegpt-output-len`.
  An entry is skipped when the prompt has < 4 tokens, the output < 4 (unless the length is fixed),
  the prompt > 1024, or prompt + output > 2048.
- custom: every entry, `--custom-output-len` tokens each. For /v1/completions the prompt is rendered
  with the chat template as one user message (vLLM's default; `--skip-chat-template` sends it bare);
  pdserve sends the rendered prompt's token ids, so no second BOS is added. A chat endpoint gets
  the bare prompt (its server renders it).
- When a file has fewer usable entries than requests, they repeat in the same order (vLLM draws the
  extra ones at random).

`stream` selects disjoint samples, as it selects independent random prompts: stream s takes the
usable entries from position s x num_prompts on (wrapping round a file too small for that), so a
sweep's rates and the warm-up (stream 1, at most num_prompts of it) send each other's prompts only
when the file runs out, and stream 0 is vLLM's sample.

Random prompts for a chat endpoint become text as vLLM's random dataset makes it: the ids are
decoded, re-encoded (without special tokens) and cut or topped up with more random ids until the
text has the drawn number of tokens (at most 10 rounds).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from pdserve.bench.datasets import DatasetEntry, DatasetError, load_dataset
from pdserve.bench.tokenizer import BenchTokenizer
from pdserve.bench.workload import (
    PREFIX_STREAM,
    BenchRequest,
    WorkloadConfig,
    allowed_token_ids,
    draw_adapters,
    make_requests,
)

# vLLM's is_valid_sequence defaults (copied there from benchmark_serving.py's ShareGPT sampler).
MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048
ALIGN_ROUNDS = 10  # vLLM's gen_prompt_decode_to_target_len retries
_BATCH = 64  # entries tokenized at once while scanning a file
_TOP_UP_STREAM = PREFIX_STREAM + 2  # rng of the ids that lengthen a chat prompt's text (after LORA_STREAM)


def needs_tokenizer(workload: WorkloadConfig, chat: bool) -> bool:
    """Whether `build_requests` needs a tokenizer: for a dataset, or random ids sent as chat text."""
    return chat or not workload.is_random


async def build_requests(
    workload: WorkloadConfig, tokenizer: BenchTokenizer | None, chat: bool, stream: int = 0, count: int | None = None
) -> list[BenchRequest]:
    """`count` requests (default `workload.num_prompts`) of prompt stream `stream`.

    Raises DatasetError for an unusable file, RuntimeError when the tokenizer fails (a server
    without /tokenize), ValueError when a tokenizer is needed and `tokenizer` is None."""
    n = workload.num_prompts if count is None else count
    if n == 0:
        return []
    if workload.is_random:
        reqs = make_requests(replace(workload, num_prompts=n), stream)
        return await _as_chat_text(workload, reqs, _need(tokenizer), stream) if chat else reqs
    tok = _need(tokenizer)
    assert workload.dataset_path is not None
    dataset = load_dataset(workload.dataset_name, workload.dataset_path)
    order = list(dataset.entries)
    if not workload.disable_shuffle:
        random.Random(workload.seed).shuffle(order)  # vLLM: random.seed(seed); random.shuffle(data)
    skip = stream * workload.num_prompts
    if workload.dataset_name == "sharegpt":
        samples = await _sharegpt(order, tok, workload.sharegpt_output_len, skip + n)
    else:
        samples = [_Sample(e, (), workload.custom_output_len) for e in order]
    if not samples:
        raise DatasetError(
            f"no conversation of {workload.dataset_path!r} passes vLLM's length filters (prompt "
            f"and reply >= {MIN_LEN} tokens, prompt <= {MAX_PROMPT_LEN}, both <= {MAX_TOTAL_LEN})"
        )
    picked = [samples[(skip + j) % len(samples)] for j in range(n)]
    # A custom prompt rendered for /v1/completions is sent as its ids; every other one as text.
    as_ids = workload.dataset_name == "custom" and not chat and not workload.skip_chat_template
    if workload.dataset_name == "custom":
        picked = await _tokenize_custom(picked, tok, bare=not chat and workload.skip_chat_template)
    adapters = draw_adapters(workload, stream, n)
    return [
        BenchRequest(
            index=j,
            prompt_token_ids=s.ids,
            output_len=s.output_len,
            model=adapter,
            prompt_text=None if as_ids else s.entry.prompt,
            ignore_eos=workload.ignore_eos,
        )
        for j, (s, adapter) in enumerate(zip(picked, adapters, strict=True))
    ]


def _need(tokenizer: BenchTokenizer | None) -> BenchTokenizer:
    if tokenizer is None:
        raise ValueError("this workload needs a tokenizer (a dataset, or a chat endpoint)")
    return tokenizer


@dataclass(frozen=True)
class _Sample:
    entry: DatasetEntry
    ids: tuple[int, ...]  # the prompt's tokens (a custom prompt's: its chat rendering's, unless sent bare)
    output_len: int


def is_valid_sequence(prompt_len: int, output_len: int, fixed_output_len: bool) -> bool:
    """vLLM's ShareGPT filter: prompt and output >= 4 tokens (the output unchecked when fixed),
    prompt <= 1024, prompt + output <= 2048."""
    return (
        prompt_len >= MIN_LEN
        and (fixed_output_len or output_len >= MIN_LEN)
        and prompt_len <= MAX_PROMPT_LEN
        and prompt_len + output_len <= MAX_TOTAL_LEN
    )


async def _sharegpt(
    order: Sequence[DatasetEntry], tok: BenchTokenizer, fixed_out: int | None, wanted: int
) -> list[_Sample]:
    """The usable entries of `order`, in order: the first `wanted` of them, or all when fewer."""
    out: list[_Sample] = []
    for start in range(0, len(order), _BATCH):
        batch = order[start : start + _BATCH]
        prompts = await tok.encode([e.prompt for e in batch], add_special_tokens=True)
        if fixed_out is None:
            replies = [len(r) for r in await tok.encode([e.reply or "" for e in batch], add_special_tokens=True)]
        else:
            replies = [fixed_out] * len(batch)
        for entry, ids, n_out in zip(batch, prompts, replies, strict=True):
            if is_valid_sequence(len(ids), n_out, fixed_out is not None):
                out.append(_Sample(entry, tuple(ids), n_out))
                if len(out) >= wanted:
                    return out
    return out


async def _tokenize_custom(picked: list[_Sample], tok: BenchTokenizer, bare: bool) -> list[_Sample]:
    """Token ids of each picked custom prompt: bare, or rendered as a user message (what the
    server prefills: for a chat endpoint, and for completions unless --skip-chat-template)."""
    texts = [s.entry.prompt for s in picked]
    ids = await (tok.encode(texts, add_special_tokens=True) if bare else tok.encode_chat(texts))
    return [replace(s, ids=tuple(i)) for s, i in zip(picked, ids, strict=True)]


async def _as_chat_text(
    workload: WorkloadConfig, reqs: list[BenchRequest], tok: BenchTokenizer, stream: int
) -> list[BenchRequest]:
    """Random prompts as text of (nearly always) the drawn number of tokens, for a chat message."""
    rng = np.random.default_rng([workload.seed, stream, _TOP_UP_STREAM])
    allowed = allowed_token_ids(workload)
    seqs = [list(r.prompt_token_ids) for r in reqs]
    targets = [len(s) for s in seqs]
    texts = [""] * len(seqs)
    pending = list(range(len(seqs)))
    for round_ in range(ALIGN_ROUNDS + 1):
        decoded = await tok.decode([seqs[i] for i in pending])
        encoded = await tok.encode(decoded, add_special_tokens=False)
        still: list[int] = []
        for i, text, ids in zip(pending, decoded, encoded, strict=True):
            texts[i], seqs[i] = text, ids  # the text and the tokens it is sent as
            if len(ids) != targets[i] and round_ < ALIGN_ROUNDS:
                extra = targets[i] - len(ids)
                seqs[i] = ids[: targets[i]] if extra < 0 else ids + [int(t) for t in rng.choice(allowed, extra)]
                still.append(i)
        pending = still
        if not pending:
            break
    return [replace(r, prompt_text=texts[i], prompt_token_ids=tuple(seqs[i])) for i, r in enumerate(reqs)]
