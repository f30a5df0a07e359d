"""Speculative decoding counters (vLLM's spec_decode metrics), lifetime totals of one engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecDecodeStats:
    """`num_drafts`: speculative rows verified (one per request and step that had drafts);
    `num_draft_tokens`: their drafts; `num_accepted_tokens`: the drafts the target accepted;
    `accepted_per_pos[i]`: the rows whose draft i was accepted (vLLM's per-position counter)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafts (0 before any)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per speculative row: 1 + accepted drafts per row (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def add(self, num_draft_tokens: int, num_accepted_tokens: int) -> SpecDecodeStats:
        """These totals plus one speculative row (its accepted drafts are its first ones)."""
        per_pos = list(self.accepted_per_pos)
        per_pos += [0] * (num_draft_tokens - len(per_pos))
        for i in range(num_accepted_tokens):
            per_pos[i] += 1
        return SpecDecodeStats(self.num_drafts + 1, self.num_draft_tokens + num_draft_tokens,
                               self.num_accepted_tokens + num_accepted_tokens, tuple(per_pos))
