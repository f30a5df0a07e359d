"""Token sampling for a batch: penalties, greedy, temperature, top-k, top-p, min-p, per-request
seeds, min_tokens, vLLM's allowed_token_ids and bad_words.

Speculative rows: one request may fill several consecutive rows, one per position it verifies;
`prepare` then takes, for each row, the drafts that precede its position (counted as output by
penalties and min_tokens), and a seeded request's generator draws for its rows in order, its state
saved before each so that the runner can rewind it past the rows whose sample is discarded
(`rewind`): its stream then advances by exactly the tokens it emitted, as without speculation.

No host sync: `prepare` builds the per-row tensors on the host and copies them asynchronously
(pinned memory on CUDA; call it before the forward pass so the copies queue behind nothing), and
`__call__` returns the sampled ids on the logits' device: the runner's one `.tolist()` per step is
the only point where the host waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.staging import to_device


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling tensors, built once per step from the scheduled requests."""

    temperature: torch.Tensor  # [N] float32; 0 rows are greedy
    top_k: torch.Tensor | None  # [N] long (vocab size where disabled), None when no row uses it
    top_p: torch.Tensor | None  # [N] float32, None when no row uses it
    all_greedy: bool
    # (rows, token ids) that must not be sampled (min_tokens not reached, bad_words): an index pair
    # for logits[rows, ids], or None when no row has a ban.
    banned: tuple[torch.Tensor, torch.Tensor] | None
    # (row, generator) for rows with a per-request seed.
    seeded: list[tuple[int, torch.Generator]]
    penalties: Penalties | None = None  # None when no row uses one
    # (rows, token ids, biases) of SamplingParams.logit_bias, or None when no row has one.
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    min_p: torch.Tensor | None = None  # [N, 1] float32, None when no row uses it
    # The largest top_k of the rows whose sample counts (non-greedy), known on the host: when small,
    # top-k (and top-p within it) takes a partial top-k instead of sorting the vocabulary.
    top_k_max: int | None = None
    # SamplingParams.allowed_token_ids: (rows restricted, per allowed id its index into those rows,
    # the ids), or None when no row is restricted.
    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Seeded rows of speculative requests whose generator state is kept before the row's draw
    # (filled by Sampler.__call__, read by Sampler.rewind).
    rewindable: frozenset[int] = frozenset()
    saved_states: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Penalties:
    """Per-row presence / frequency / repetition penalties and what they act on. Built only for
    steps where a row uses one: the counts cost O(tokens of those requests) per step."""

    presence: torch.Tensor  # [N, 1] float32
    frequency: torch.Tensor  # [N, 1] float32
    repetition: torch.Tensor  # [N, 1] float32 (1: off)
    output_counts: torch.Tensor  # [N, V] float32: how often each token is in the row's output
    seen: torch.Tensor  # [N, V] bool: in the row's prompt or output

    @classmethod
    def of(cls, requests: list[Request], vocab_size: int, device: torch.device,
           preceding: Sequence[Sequence[int]] | None = None) -> Penalties:
        """`preceding[i]`: tokens after row i's output (a speculative row's earlier drafts)."""
        rows, ids, prompt_rows, prompt_ids = [], [], [], []
        for i, r in enumerate(requests):
            if not r.sampling_params.uses_penalties:
                continue
            out = r.output_token_ids if preceding is None else [*r.output_token_ids, *preceding[i]]
            rows += [i] * len(out)
            ids += out
            if r.sampling_params.repetition_penalty != 1.0:
                prompt_rows += [i] * len(r.prompt_token_ids)
                prompt_ids += r.prompt_token_ids
        n = len(requests)
        counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
        if ids:
            idx = (to_device(rows, torch.long, device), to_device(ids, torch.long, device))
            counts.index_put_(idx, torch.ones(len(ids), device=device), accumulate=True)
        seen = counts > 0
        if prompt_ids:
            seen[to_device(prompt_rows, torch.long, device), to_device(prompt_ids, torch.long, device)] = True
        sps = [r.sampling_params for r in requests]

        def column(values: list[float]) -> torch.Tensor:
            return to_device(values, torch.float32, device).unsqueeze(1)

        return cls(column([sp.presence_penalty for sp in sps]), column([sp.frequency_penalty for sp in sps]),
                   column([sp.repetition_penalty for sp in sps]), counts, seen)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rep = torch.where(self.seen, self.repetition, torch.ones_like(self.repetition))
        logits = torch.where(logits > 0, logits / rep, logits * rep)
        return logits - self.frequency * self.output_counts - self.presence * (self.output_counts > 0)


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

    def prepare(
        self, requests: list[Request], preceding: Sequence[Sequence[int]] | None = None,
        kept: Sequence[bool] | None = None,
    ) -> SamplingBatch:
        """Per-row tensors; row i samples for `requests[i]`. `preceding[i]` (speculative steps):
        the drafts between the request's output and row i's position. `kept[i]` False: row i's
        sample is discarded (a partial prefill chunk), so it takes nothing from a seeded request's
        generator, whose stream then depends on the request's tokens alone, not on the chunking."""
        sps = [r.sampling_params for r in requests]
        n_before = [len(r.output_token_ids) for r in requests]
        if preceding is not None:
            n_before = [n + len(p) for n, p in zip(n_before, preceding, strict=True)]
        temps = [0.0 if sp.greedy else sp.temperature for sp in sps]
        # Each row's top_k (vocab size where disabled), None when no row uses it.
        ks = [min(sp.top_k, self.vocab_size) if sp.uses_top_k else self.vocab_size for sp in sps] \
            if any(sp.uses_top_k for sp in sps) else None
        use_p = any(sp.uses_top_p for sp in sps)
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, r in enumerate(requests):
            sp = r.sampling_params
            if n_before[i] < sp.min_tokens:
                ban = list(sp.stop_token_ids) + ([] if sp.ignore_eos else sorted(r.eos_token_ids))
                ban = [t for t in ban if 0 <= t < self.vocab_size]  # others are never sampled anyway
                ban_rows.extend([i] * len(ban))
                ban_ids.extend(ban)
            if r.bad_words is not None:
                bad = r.bad_words.banned(r.output_token_ids, preceding[i] if preceding is not None else ())
                ban_rows.extend([i] * len(bad))
                ban_ids.extend(bad)
        dev = self.device
        seeded = [(i, self._generator(r)) for i, r in enumerate(requests)
                  if r.sampling_params.seed is not None and not r.sampling_params.greedy and (kept is None or kept[i])]
        return SamplingBatch(
            temperature=to_device(temps, torch.float32, dev),
            top_k=to_device(ks, torch.long, dev) if ks is not None else None,
            top_p=to_device([sp.top_p for sp in sps], torch.float32, dev) if use_p else None,
            top_k_max=max((k for k, t in zip(ks, temps, strict=True) if t != 0.0), default=None)
            if ks is not None else None,
            all_greedy=all(t == 0.0 for t in temps),
            banned=(to_device(ban_rows, torch.long, dev), to_device(ban_ids, torch.long, dev)) if ban_rows else None,
            seeded=seeded,
            penalties=Penalties.of(requests, self.vocab_size, dev, preceding)
            if any(sp.uses_penalties for sp in sps) else None,
            bias=self._bias(sps),
            min_p=to_device([[sp.min_p] for sp in sps], torch.float32, dev) if any(sp.uses_min_p for sp in sps)
            else None,
            rewindable=frozenset(i for i, _ in seeded) if preceding is not None else frozenset(),
            allowed=self._allowed(sps),
        )

    def rewind(self, batch: SamplingBatch, row: int) -> None:
        """Put the generator of seeded row `row` back to its state before that row's draw (the row
        and the later rows of its request are discarded). No-op for rows without a saved state."""
        state = batch.saved_states.get(row)
        if state is not None:
            dict(batch.seeded)[row].set_state(state)

    def _bias(self, sps: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        rows = [i for i, sp in enumerate(sps) for _ in sp.logit_bias]
        if not rows:
            return None
        ids = [t for sp in sps for t, _ in sp.logit_bias]
        values = [b for sp in sps for _, b in sp.logit_bias]
        dev = self.device
        return to_device(rows, torch.long, dev), to_device(ids, torch.long, dev), to_device(values, torch.float32, dev)

    def _allowed(self, sps: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        rows = [i for i, sp in enumerate(sps) if sp.allowed_token_ids is not None]
        if not rows:
            return None
        lists = [sps[i].allowed_token_ids or () for i in rows]
        id_rows = [k for k, ids in enumerate(lists) for _ in ids]
        dev = self.device
        return (to_device(rows, torch.long, dev), to_device(id_rows, torch.long, dev),
                to_device([t for ids in lists for t in ids], torch.long, dev))

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [N, V] float32 -> token ids [N] long (on the logits' device; no host sync)."""
        logits = logits[:, : self.vocab_size]
        if batch.penalties is not None:
            logits = batch.penalties.apply(logits)
        if batch.bias is not None:
            rows, ids, values = batch.bias
            logits = logits.index_put((rows, ids), values, accumulate=True)
        if batch.banned is not None:
            logits.index_put_(batch.banned, logits.new_full((), float("-inf")))
        if batch.allowed is not None:
            logits = _keep_only(logits, *batch.allowed)
        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_ids
        temp = batch.temperature.clamp_min(1e-5).unsqueeze(1)
        scaled = logits / temp
        if batch.top_k is not None and batch.top_k_max is not None and batch.top_k_max <= TOP_K_PARTIAL_MAX:
            scaled = _apply_top_k_top_p_partial(scaled, batch.top_k, batch.top_p, batch.top_k_max)
        elif batch.top_k is not None or batch.top_p is not None:
            scaled = _apply_top_k_top_p(scaled, batch.top_k, batch.top_p)
        probs = torch.softmax(scaled, dim=-1)
        if batch.min_p is not None:  # (the race below needs no renormalization)
            probs = probs.masked_fill(probs < batch.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p; seeded rows draw their own E.
        noise = torch.empty_like(probs).exponential_()
        for row, gen in batch.seeded:
            if row in batch.rewindable:
                batch.saved_states[row] = gen.get_state()
            noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.temperature == 0.0, greedy_ids, sampled)


def _keep_only(logits: torch.Tensor, rows: torch.Tensor, id_rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`logits` with every token but `ids` (the k-th one allowed in row `rows[id_rows[k]]`) at -inf in `rows`."""
    keep = torch.zeros(rows.numel(), logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[id_rows, ids] = True
    return logits.index_copy(0, rows, logits.index_select(0, rows).masked_fill(~keep, float("-inf")))


# Up to this top_k (every non-greedy row's), a partial top-k replaces the sort of the vocabulary:
# the same kept set and order (so the same top-p within it), at a fraction of the cost for a 150k
# vocabulary (Qwen3's generation_config asks top_k 20 of every request). Where several logits tie
# at the k-th place (bf16 logits often do), which of them are kept is arbitrary in both ways.
TOP_K_PARTIAL_MAX = 1024


def _apply_top_k_top_p_partial(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None, k_max: int
) -> torch.Tensor:
    """_apply_top_k_top_p when no row keeps more than `k_max` tokens: only the k_max largest logits
    of each row are sorted; a row's top_k and then top_p mask them as the full sort would."""
    values, order = logits.topk(k_max, dim=-1)  # sorted, descending
    ranks = torch.arange(k_max, device=logits.device)
    mask = ranks[None, :] >= top_k[:, None]
    if top_p is not None:
        probs = torch.softmax(values.masked_fill(mask, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        mask |= before > top_p[:, None]
    values = values.masked_fill(mask, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, values)


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
