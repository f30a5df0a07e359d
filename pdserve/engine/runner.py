"""Builds the flat batch for a scheduled step, runs the model over the paged KV cache, samples.

Decode-only steps go to the StaticDecoder when one is set (CUDA graphs; see cuda_graphs.py), every
other step runs eagerly on the flat batch. A speculative row (scheduler.py) is a prefill span of its
last token and its drafts: its logits are taken at every position, each sampled as a plain decode
at that position would be, and verified (spec/rejection.py). Where attention supports it
(attention.multi_query_supported: not CUDA) a step's speculative rows and decodes are attended
together, as decodes of several queries each (attention.MultiQueryRows). Per-step inputs reach the
device by asynchronous copies (staging.py); the sampled ids' `.tolist()` is the step's one host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pdserve.engine.cuda_graphs import StaticDecoder
from pdserve.engine.logprobs import BatchLogprobs, TokenLogprob
from pdserve.engine.lora import LoRAManager
from pdserve.engine.pooler import Pooler
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler, SamplingBatch
from pdserve.engine.scheduler import ScheduledBatch
from pdserve.engine.spec.rejection import verify
from pdserve.engine.staging import to_device
from pdserve.engine.structured import apply_bitmask_
from pdserve.model.attention import (
    AttentionMetadata,
    MultiQueryRows,
    PrefillSpan,
    QueryRow,
    multi_query_supported,
)

PROMPT_LOGPROB_ROWS = 256  # prompt positions per logits matrix (rows x vocab, float32)


@dataclass(frozen=True)
class StepResult:
    """What one step produced, by request id."""

    tokens: dict[str, int]  # every request in the batch (a partial prefill's is discarded)
    # Requests with SamplingParams.logprobs: one per emitted token (a speculative row's accepted
    # drafts, then its sampled token), each from its own position's distribution.
    logprobs: dict[str, list[TokenLogprob]]
    prompt_logprobs: dict[str, list[TokenLogprob]]  # new prompt entries, SamplingParams.prompt_logprobs
    pooled: dict[str, list[float]] = field(default_factory=dict)  # pooling requests whose prompt completed
    # Speculative rows: the drafts they accepted (`tokens` holds the token sampled after them).
    accepted: dict[str, list[int]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self, model: nn.Module, kv_cache: torch.Tensor, block_size: int, vocab_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(device, vocab_size)
        # Write-mode seam: called with (layer index, batch) once a layer's KV is in the cache.
        self.layer_hook: Callable[[int], None] | None = None
        # Static-shape decode steps (CUDA graphs), set by the engine; None: every step eager.
        self.static: StaticDecoder | None = None
        # Multi-LoRA (engine/lora.py), set by the engine with --enable-lora.
        self.lora: LoRAManager | None = None
        self.pooler = Pooler()  # embedding requests (always prefill chunks: never a static step)

    def _slots(self, req: Request, start: int, end: int) -> list[int]:
        bs, blocks = self.block_size, req.block_ids
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def build(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat token ids, positions, attention metadata, and the row of each request's last token."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_rows: list[int] = []
        for req in batch.decodes:
            p = req.num_computed_tokens
            tokens.append(req.token_ids(p, p + 1)[0])
            positions.append(p)
            slots.extend(self._slots(req, p, p + 1))
            last_rows.append(len(tokens) - 1)
        max_blocks = max((len(r.block_ids) for r in batch.decodes), default=0)
        tables = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in batch.decodes]
        spans: list[PrefillSpan] = []
        for req, n in batch.prefills:
            p = req.num_computed_tokens
            spans.append(
                PrefillSpan(
                    q_start=len(tokens),
                    q_len=n,
                    num_cached=p,
                    block_ids=to_device(req.block_ids, torch.long, self.device),
                )
            )
            drafts = batch.spec.get(req.request_id, ())
            tokens.extend(req.token_ids(p, p + n - len(drafts)))
            tokens.extend(drafts)
            positions.extend(range(p, p + n))
            slots.extend(self._slots(req, p, p + n))
            last_rows.append(len(tokens) - 1)
        dev = self.device
        meta = AttentionMetadata(
            block_size=self.block_size,
            slot_mapping=to_device(slots, torch.long, dev),
            num_decode_tokens=len(batch.decodes),
            decode_block_tables=to_device(tables, torch.long, dev).view(len(tables), max_blocks),
            decode_context_lens=to_device([r.num_computed_tokens + 1 for r in batch.decodes], torch.long, dev),
            prefills=spans,
            multi_query=self._multi_query(batch, spans),
            layer_hook=self.layer_hook,
        )
        ids = to_device(tokens, torch.long, dev)
        pos = to_device(positions, torch.long, dev)
        return ids, pos, meta, last_rows

    def _multi_query(self, batch: ScheduledBatch, spans: list[PrefillSpan]) -> MultiQueryRows | None:
        """The step's decodes and speculative rows as one multi-query group, on devices whose
        attention takes one and in steps with speculative rows; None otherwise."""
        if not batch.spec or not multi_query_supported(self.device):
            return None
        rows = [QueryRow(i, 1, r.num_computed_tokens + 1, r.block_ids) for i, r in enumerate(batch.decodes)]
        spec_spans = [i for i, (r, _) in enumerate(batch.prefills) if r.request_id in batch.spec]
        for i in spec_spans:
            span, req = spans[i], batch.prefills[i][0]
            rows.append(QueryRow(span.q_start, span.q_len, span.num_cached + span.q_len, req.block_ids))
        return MultiQueryRows.of(rows, spec_spans, self.device)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, bitmask: torch.Tensor | None = None) -> StepResult:
        """Run one step: the sampled tokens, and the logprobs of requests that ask. `bitmask`
        (structured.py; one row per sampled row: decodes, then prefills, a speculative row's
        positions each) limits what each row may sample."""
        rows = _sample_rows(batch)
        # First: its copies queue ahead of the forward pass.
        sampling = self.sampler.prepare([r.request for r in rows],
                                        [r.preceding for r in rows] if batch.spec else None, [r.kept for r in rows])
        prompt_logprobs: dict[str, list[TokenLogprob]] = {}
        pooled: dict[str, list[float]] = {}
        adapted = self.lora is not None and self.lora.prepare(_rows(batch))
        if self.static is not None and not batch.prefills and not adapted and self.static.accepts(batch.decodes):
            logits = self.static.run(batch.decodes)
        else:
            ids, pos, meta, last_rows = self.build(batch)
            hidden = self.model(ids, pos, self.kv_cache, meta)
            logit_rows = to_device(_logit_rows(batch, last_rows), torch.long, self.device)
            logits = self.model.compute_logits(hidden.index_select(0, logit_rows))
            prompt_logprobs = self._prompt_logprobs(batch, hidden, last_rows[len(batch.decodes):])
            pooled = self.pooler.pool(batch.prefills, hidden, last_rows[len(batch.decodes):])
        if bitmask is not None:
            apply_bitmask_(logits, bitmask)
        sps = [r.request.sampling_params for r in rows]
        logprobs = BatchLogprobs.of(logits[:, : self.sampler.vocab_size], [sp.logprobs for sp in sps],
                                    [sp.allowed_token_ids if sp.top_logprobs_within_allowed else None for sp in sps])
        ids = self.sampler(logits, sampling)
        tokens, accepted, emitted_rows = self._verify(batch, ids.tolist(), sampling)
        if logprobs is None:
            return StepResult(tokens, {}, prompt_logprobs, pooled, accepted)
        asked = [row for row in emitted_rows if logprobs.rows[row] is not None]
        chosen: dict[str, list[TokenLogprob]] = {}
        for row, lp in zip(asked, logprobs.resolve(ids, asked), strict=True):
            if lp is not None:
                chosen.setdefault(rows[row].request.request_id, []).append(lp)
        return StepResult(tokens, chosen, prompt_logprobs, pooled, accepted)

    def _verify(
        self, batch: ScheduledBatch, sampled: list[int], sampling: SamplingBatch,
    ) -> tuple[dict[str, int], dict[str, list[int]], list[int]]:
        """Each request's token (a speculative row's: after its accepted drafts), the accepted drafts
        of speculative rows, and the rows whose tokens are emitted. A seeded generator is rewound
        past the rows a rejection discards."""
        tokens: dict[str, int] = {}
        accepted: dict[str, list[int]] = {}
        emitted_rows: list[int] = []
        row = 0
        for req in batch.decodes + [r for r, _ in batch.prefills]:
            drafts = batch.spec.get(req.request_id, [])
            emitted = verify(drafts, sampled[row : row + len(drafts) + 1])
            tokens[req.request_id] = emitted[-1]
            if drafts:
                accepted[req.request_id] = emitted[:-1]
                if len(emitted) <= len(drafts):
                    self.sampler.rewind(sampling, row + len(emitted))
            emitted_rows.extend(range(row, row + len(emitted)))
            row += len(drafts) + 1
        return tokens, accepted, emitted_rows

    def _prompt_logprobs(
        self, batch: ScheduledBatch, hidden: torch.Tensor, last_rows: list[int]
    ) -> dict[str, list[TokenLogprob]]:
        """For prefill chunks of requests with prompt_logprobs: the logprob of each prompt token
        t >= 1 under the logits of position t - 1, for the t this chunk computes for the first time."""
        out: dict[str, list[TokenLogprob]] = {}
        vocab = self.sampler.vocab_size
        for (req, n), last_row in zip(batch.prefills, last_rows, strict=True):
            k = req.sampling_params.prompt_logprobs
            p = req.num_computed_tokens
            first, last = max(p + 1, len(req.prompt_logprobs) + 1), min(p + n, req.num_prompt_tokens - 1)
            if k is None or first > last:
                continue
            row0 = last_row - n + 1 - p  # + position = the row of that position in this step
            entries: list[TokenLogprob] = []
            for lo in range(first, last + 1, PROMPT_LOGPROB_ROWS):
                hi = min(lo + PROMPT_LOGPROB_ROWS, last + 1)
                rows = to_device([row0 + t - 1 for t in range(lo, hi)], torch.long, self.device)
                logits = self.model.compute_logits(hidden.index_select(0, rows))[:, :vocab]
                targets = to_device(req.prompt_token_ids[lo:hi], torch.long, self.device)
                rows_lp = BatchLogprobs(torch.log_softmax(logits.float(), dim=-1), [k] * (hi - lo))
                entries += [lp for lp in rows_lp.resolve(targets) if lp is not None]
            out[req.request_id] = entries
        return out


@dataclass(frozen=True)
class _SampleRow:
    """One row of a step's logits: its request, the drafts before its position (a speculative
    row's later positions), and whether its sample is kept (not for a partial prefill chunk)."""

    request: Request
    preceding: list[int]
    kept: bool


def _sample_rows(batch: ScheduledBatch) -> list[_SampleRow]:
    """The step's sampled rows, in logits order."""
    rows = [_SampleRow(r, [], True) for r in batch.decodes]
    for req, n in batch.prefills:
        drafts = batch.spec.get(req.request_id, [])
        kept = req.num_computed_tokens + n >= req.num_tokens
        rows += [_SampleRow(req, drafts[:i], kept) for i in range(len(drafts) + 1)]
    return rows


def _logit_rows(batch: ScheduledBatch, last_rows: list[int]) -> list[int]:
    """The flat-batch rows whose logits are sampled: each request's last token, and every token of
    a speculative row (its last token's and each draft's)."""
    out = last_rows[: len(batch.decodes)]
    for (req, _), last in zip(batch.prefills, last_rows[len(batch.decodes):], strict=True):
        d = len(batch.spec.get(req.request_id, ()))
        out.extend(range(last - d, last + 1))
    return out


def _rows(batch: ScheduledBatch) -> list[tuple[Request, int, int]]:
    """(request, first row, end row) of each request in the step's flat batch: decodes, then prefills."""
    rows = [(r, i, i + 1) for i, r in enumerate(batch.decodes)]
    start = len(batch.decodes)
    for req, n in batch.prefills:
        rows.append((req, start, start + n))
        start += n
    return rows
