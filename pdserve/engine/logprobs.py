"""Log-probabilities of sampled tokens, for requests that ask for them (`SamplingParams.logprobs`).

As vLLM reports them by default: under the model's own distribution, `log_softmax` of the raw
logits, before temperature, top-k/top-p and min_tokens bans. Computed on the logits' device for
the whole batch only when a row asks; the host reads them after the sampled ids' sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.staging import to_device


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token: its log-probability, its rank (1 = the most likely token) and the
    `k` most likely tokens as (token id, log-probability), most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class BatchLogprobs:
    """Device tensors for a step's rows; `rows[i]` is the `k` of row i, or None (not asked)."""

    logprobs: torch.Tensor  # [N, V] float32
    rows: list[int | None]

    @classmethod
    def of(cls, logits: torch.Tensor, rows: list[int | None]) -> BatchLogprobs | None:
        """Call before sampling (the sampler bans tokens in `logits` in place)."""
        if all(k is None for k in rows):
            return None
        return cls(torch.log_softmax(logits.float(), dim=-1), rows)

    def resolve(self, sampled: torch.Tensor, only: Sequence[int] | None = None) -> list[TokenLogprob | None]:
        """`sampled` [N] ids on the device -> one TokenLogprob per row that asked (host values).
        `only`: resolve just these rows, in this order (the list follows it): a speculative step
        emits few of its rows, and each row's rank and top-k cost O(vocab)."""
        logprobs, wanted = self.logprobs, self.rows
        if only is not None:
            index = to_device(list(only), torch.long, logprobs.device)
            logprobs, sampled, wanted = logprobs[index], sampled[index], [self.rows[i] for i in only]
        chosen = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
        k = max((k for k in wanted if k is not None), default=0)
        top_v, top_i = logprobs.topk(k, dim=-1) if k else (None, None)
        ids, lps, rks = sampled.tolist(), chosen.tolist(), ranks.tolist()
        tv = top_v.tolist() if top_v is not None else None
        ti = top_i.tolist() if top_i is not None else None
        out: list[TokenLogprob | None] = []
        for i, want in enumerate(wanted):
            if want is None:
                out.append(None)
                continue
            top = tuple(zip(ti[i][:want], tv[i][:want], strict=True)) if want and ti and tv else ()
            out.append(TokenLogprob(ids[i], lps[i], rks[i], top))
        return out
