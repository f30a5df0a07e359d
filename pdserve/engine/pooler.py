"""Pooling of embedding requests in the runner: from the final (normed) hidden states the model
returns before `compute_logits`, in float32.

"last" takes the row of the prompt's last token in the step that computes it. "mean" adds each
chunk's rows to a running sum (chunked prefill spreads a prompt over steps) and divides at the end;
a chunk that starts at position 0 (a first admission, or a recompute after preemption) starts the
sum afresh. Only prefill chunks are pooled: the scheduler never runs a pooling request as a decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.request import Request


class Pooler:
    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}  # mean pooling: float32 sums of the rows so far

    def pool(self, prefills: list[tuple[Request, int]], hidden: torch.Tensor, last_rows: list[int]
             ) -> dict[str, list[float]]:
        """The vectors of the pooling requests whose prompt this step completes. `last_rows`: the
        row in `hidden` of each prefill chunk's last token (before `num_computed_tokens` advances)."""
        out: dict[str, list[float]] = {}
        for (req, n), last in zip(prefills, last_rows, strict=True):
            pooling = req.pooling
            if pooling is None:
                continue
            rid, start = req.request_id, req.num_computed_tokens
            done = start + n >= req.num_prompt_tokens
            if pooling.pooling_type == "mean":
                chunk = hidden[last - n + 1 : last + 1].float().sum(0)
                prev = self._sums.pop(rid, None) if start else None
                total = chunk if prev is None else prev + chunk
                if not done:
                    self._sums[rid] = total
                    continue
                vector = total / req.num_prompt_tokens
            elif done:
                vector = hidden[last].float()
            else:
                continue
            out[rid] = _finish(vector, pooling).tolist()
        return out

    def forget(self, request_id: str) -> None:
        self._sums.pop(request_id, None)


def _finish(vector: torch.Tensor, pooling: PoolingParams) -> torch.Tensor:
    if pooling.dimensions is not None:
        vector = vector[: pooling.dimensions]
    return F.normalize(vector, dim=-1) if pooling.normalize else vector
