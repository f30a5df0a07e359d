"""Token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds, min_tokens.

No host sync: `prepare` builds the per-row tensors on the host and copies them asynchronously
(pinned memory on CUDA; call it before the forward pass so the copies queue behind nothing), and
`__call__` returns the sampled ids on the logits' device: the runner's one `.tolist()` per step is
the only point where the host waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.request import Request
from pdserve.engine.staging import to_device


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling tensors, built once per step from the scheduled requests."""

    temperature: torch.Tensor  # [N] float32; 0 rows are greedy
    top_k: torch.Tensor | None  # [N] long (vocab size where disabled), None when no row uses it
    top_p: torch.Tensor | None  # [N] float32, None when no row uses it
    all_greedy: bool
    # (rows, token ids) that must not be sampled yet (min_tokens not reached): an index pair for
    # logits[rows, ids], or None when no row has a ban.
    banned: tuple[torch.Tensor, torch.Tensor] | None
    # (row, generator) for rows with a per-request seed.
    seeded: list[tuple[int, torch.Generator]]


class Sampler:
    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(req.sampling_params.seed))  # type: ignore[arg-type]
            self._generators[req.request_id] = gen
        return gen

    def prepare(self, requests: list[Request]) -> SamplingBatch:
        sps = [r.sampling_params for r in requests]
        temps = [0.0 if sp.greedy else sp.temperature for sp in sps]
        use_k = any(sp.uses_top_k for sp in sps)
        use_p = any(sp.uses_top_p for sp in sps)
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, r in enumerate(requests):
            sp = r.sampling_params
            if len(r.output_token_ids) < sp.min_tokens:
                ban = list(sp.stop_token_ids) + ([] if sp.ignore_eos else sorted(r.eos_token_ids))
                ban_rows.extend([i] * len(ban))
                ban_ids.extend(ban)
        dev = self.device
        return SamplingBatch(
            temperature=to_device(temps, torch.float32, dev),
            top_k=to_device([sp.top_k if sp.uses_top_k else self.vocab_size for sp in sps], torch.long, dev)
            if use_k
            else None,
            top_p=to_device([sp.top_p for sp in sps], torch.float32, dev) if use_p else None,
            all_greedy=all(t == 0.0 for t in temps),
            banned=(to_device(ban_rows, torch.long, dev), to_device(ban_ids, torch.long, dev)) if ban_rows else None,
            seeded=[
                (i, self._generator(r))
                for i, r in enumerate(requests)
                if r.sampling_params.seed is not None and not r.sampling_params.greedy
            ],
        )

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [N, V] float32 -> token ids [N] long (on the logits' device; no host sync)."""
        logits = logits[:, : self.vocab_size]
        if batch.banned is not None:
            logits.index_put_(batch.banned, logits.new_full((), float("-inf")))
        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_ids
        temp = batch.temperature.clamp_min(1e-5).unsqueeze(1)
        scaled = logits / temp
        if batch.top_k is not None or batch.top_p is not None:
            scaled = _apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
        probs = torch.softmax(scaled, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p; seeded rows draw their own E.
        noise = torch.empty_like(probs).exponential_()
        for row, gen in batch.seeded:
            noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.temperature == 0.0, greedy_ids, sampled)


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        mask |= ranks[None, :] >= top_k[:, None]
    if top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        mask |= before > top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
