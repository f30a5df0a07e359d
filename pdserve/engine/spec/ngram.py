"""N-gram prompt lookup: draft tokens copied from a request's own context (vLLM's "ngram" method).

The draft for a request whose context (prompt + output) ends in the n-gram g is the run of tokens
that followed the most recent earlier occurrence of g, for the longest n in [prompt_lookup_min,
prompt_lookup_max] that occurs earlier at all. When that run reaches the end of the context (the
occurrence overlaps the suffix: the context ends in a loop of period p), the copy goes on into the
draft itself, as an LZ77 copy does, so a loop of period p < k still drafts k tokens (vLLM's proposer
stops at the end of the context: p tokens). Pure numpy: one vectorised pass over the context per n,
on a per-request copy of the context that grows by the new tokens only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pdserve.config import SpeculativeConfig
from pdserve.engine.request import Request, RequestStatus


def ngram_drafts(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """`k` tokens that followed the most recent earlier occurrence of the longest suffix n-gram of
    `tokens` (min_n <= n <= max_n), copied on periodically past the end of `tokens` (the draft
    continues the loop the context ends in); empty when no suffix n-gram occurs earlier."""
    total = len(tokens)
    if k < 1 or total < min_n + 1:
        return tokens[:0]
    # alive[j]: the n tokens ending at position j equal the last n (j < total - 1: a token follows).
    alive = tokens[: total - 1] == tokens[-1]
    best_end = -1
    for n in range(1, min(max_n, total - 1) + 1):
        if n > 1:
            alive[: n - 1] = False
            alive[n - 1 :] &= tokens[: total - n] == tokens[total - n]
        hits = np.flatnonzero(alive)
        if hits.size == 0:
            break
        if n >= min_n:
            best_end = int(hits[-1])
    if best_end < 0:
        return tokens[:0]
    return np.resize(tokens[best_end + 1 :], k)  # cyclic: entry i >= p repeats entry i - p


class _Context:
    """A request's prompt + output as a numpy array, extended in place (amortised doubling)."""

    def __init__(self) -> None:
        self.buf = np.empty(64, dtype=np.int64)
        self.size = 0

    def sync(self, req: Request) -> np.ndarray:
        total = req.num_tokens
        if total < self.size:  # a stop string cut the output (the request is ending): start over
            self.size = 0
        if total > len(self.buf):
            grown = np.empty(max(total, 2 * len(self.buf)), dtype=np.int64)
            grown[: self.size] = self.buf[: self.size]
            self.buf = grown
        if total > self.size:
            self.buf[self.size : total] = req.token_ids(self.size, total)
            self.size = total
        return self.buf[:total]


class NgramProposer:
    """Drafts for the running requests that may speculate (see `max_drafts`)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._contexts: dict[str, _Context] = {}

    def max_drafts(self, req: Request) -> int:
        """How many drafts `req` may take this step: 0 unless it is decoding (every token but its
        last computed) and not pooling; at most num_speculative_tokens, and one fewer than the
        tokens it may still emit (max_tokens, the context limit), since a verified step emits the
        drafts it accepts plus one. (A constrained request's drafts are cut further, where its
        grammar rejects one: the engine's structured outputs do that.)"""
        if (req.status != RequestStatus.RUNNING or req.num_computed_tokens != req.num_tokens - 1
                or req.pooling is not None):
            return 0
        room = req.max_output_tokens - len(req.output_token_ids) - 1
        return max(0, min(self.config.num_speculative_tokens, room))

    def propose(self, requests: Iterable[Request]) -> dict[str, list[int]]:
        """Request id -> its drafts, for the requests that have any."""
        out: dict[str, list[int]] = {}
        cfg = self.config
        requests = list(requests)
        if cfg.disable_by_batch_size is not None and len(requests) >= cfg.disable_by_batch_size:
            return out
        for req in requests:
            k = self.max_drafts(req)
            if k == 0:
                continue
            ctx = self._contexts.get(req.request_id)
            if ctx is None:
                ctx = self._contexts[req.request_id] = _Context()
            drafts = ngram_drafts(ctx.sync(req), cfg.prompt_lookup_min, cfg.prompt_lookup_max, k)
            if drafts.size:
                out[req.request_id] = drafts.tolist()
        return out

    def forget(self, request_id: str) -> None:
        self._contexts.pop(request_id, None)
