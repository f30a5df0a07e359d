"""Verification of a request's drafts against the target model's tokens (speculative sampling).

A speculative row of d drafts x_1..x_d computes the target's processed distributions p_0..p_d
(after penalties, logit bias, bans, temperature, top-k/top-p/min-p: the sampler's, position by
position, each with the drafts before it counted as output). The sampler draws y_i ~ p_i for every
position, as it would without speculation (greedy: y_i = argmax). Then, in order, draft x_{i+1} is
accepted when it equals y_i; at the first mismatch y_i is emitted instead and the rest dropped;
after d acceptances y_d is the bonus token.

For a deterministic (one-hot) draft this is exactly the standard rejection rule: x is accepted with
probability P(y = x) = p(x), and on rejection the emitted y is distributed as p conditioned on
y != x, i.e. p with x removed and renormalised; so every emitted token has the non-speculative
distribution. Greedy output is the non-speculative output token for token. And since position i
draws the same random numbers as a plain decode step at that position would (a seeded request's
generator is rewound past the discarded rows), a seeded request samples the same tokens with or
without speculation, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Sequence


def num_accepted(draft_ids: Sequence[int], target_ids: Sequence[int]) -> int:
    """How many leading drafts the target tokens (one per position, len(draft_ids) + 1 of them) accept."""
    n = 0
    for draft, target in zip(draft_ids, target_ids, strict=False):
        if draft != target:
            break
        n += 1
    return n


def verify(draft_ids: Sequence[int], target_ids: Sequence[int]) -> list[int]:
    """The tokens a speculative row emits: its accepted drafts, then the target's token at the
    first rejected position (or the bonus token after the last draft)."""
    if len(target_ids) != len(draft_ids) + 1:
        raise ValueError(f"{len(draft_ids)} drafts need {len(draft_ids) + 1} target tokens, got {len(target_ids)}")
    return list(target_ids[: num_accepted(draft_ids, target_ids) + 1])
