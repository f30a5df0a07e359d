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
    # Per row, the token ids its top k are taken from (None: the whole vocabulary): beam search's
    # candidates under allowed_token_ids (SamplingParams.top_logprobs_within_allowed).
    within: list[Sequence[int] | None] | None = None

    @classmethod
    def of(
        cls, logits: torch.Tensor, rows: list[int | None], within: list[Sequence[int] | None] | None = None
    ) -> BatchLogprobs | None:
        """Call before sampling (the sampler bans tokens in `logits` in place)."""
        if all(k is None for k in rows):
            return None
        return cls(torch.log_softmax(logits.float(), dim=-1), rows,
                   within if within is not None and any(w is not None for w in within) else None)

    def resolve(self, sampled: torch.Tensor, only: Sequence[int] | None = None) -> list[TokenLogprob | None]:
        """`sampled` [N] ids on the device -> one TokenLogprob per row that asked (host values).
        `only`: resolve just these rows, in this order (the list follows it): a speculative step
        emits few of its rows, and each row's rank and top-k cost O(vocab)."""
        logprobs, wanted, within = self.logprobs, self.rows, self.within
        if only is not None:
            index = to_device(list(only), torch.long, logprobs.device)
            logprobs, sampled, wanted = logprobs[index], sampled[index], [self.rows[i] for i in only]
            within = [within[i] for i in only] if within is not None else None
        chosen = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
        k = max((k for k in wanted if k is not None), default=0)
        top_v, top_i = _within(logprobs, within).topk(k, dim=-1) if k else (None, None)
        ids, lps, rks = sampled.tolist(), chosen.tolist(), ranks.tolist()
        tv = top_v.tolist() if top_v is not None else None
        ti = top_i.tolist() if top_i is not None else None
        out: list[TokenLogprob | None] = []
        for i, want in enumerate(wanted):
            if want is None:
                out.append(None)
                continue
            top = tuple(zip(ti[i][:want], tv[i][:want], strict=True)) if want and ti and tv else ()
            if within is not None and within[i] is not None:  # fewer allowed ids than k: not the -inf fill
                top = tuple((t, v) for t, v in top if v != float("-inf"))
            out.append(TokenLogprob(ids[i], lps[i], rks[i], top))
        return out


def _within(logprobs: torch.Tensor, within: list[Sequence[int] | None] | None) -> torch.Tensor:
    """`logprobs` with every token outside a row's `within` ids at -inf (rows without: as they are)."""
    if within is None:
        return logprobs
    rows = [i for i, ids in enumerate(within) if ids is not None]
    id_rows = [k for k, i in enumerate(rows) for _ in within[i] or ()]
    ids = [t for i in rows for t in within[i] or ()]
    dev = logprobs.device
    keep = torch.zeros(len(rows), logprobs.shape[-1], dtype=torch.bool, device=dev)
    keep[to_device(id_rows, torch.long, dev), to_device(ids, torch.long, dev)] = True
    index = to_device(rows, torch.long, dev)
    return logprobs.index_copy(0, index, logprobs.index_select(0, index).masked_fill(~keep, float("-inf")))
