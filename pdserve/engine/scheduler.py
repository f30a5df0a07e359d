"""Continuous batching with chunked prefill under a per-step token budget. Pure Python.

Each step: running requests first (decodes, then unfinished prefill chunks), preempting a running
request by recompute when blocks run out; then waiting requests in queue order while the token
budget, `max_num_seqs` and free blocks allow. Requests in WAITING_FOR_REMOTE_KVS are skipped until
the KV connector reports their blocks ready.

The policy (SchedulerConfig.policy, vLLM's --scheduling-policy) decides the order:

* fcfs: the queue is in arrival order (a preempted request goes back to its front), `running` in
  admission order, and the victim is the newest running request.
* priority: the queue and `running` are kept sorted by `rank` = (priority, arrival), lower first;
  the victim is the running request that ranks last, and a waiting request that does not find the
  blocks it needs preempts running requests that rank after it (worst first, and only when that
  frees enough). A victim always ranks after the request it makes room for, so two requests never
  preempt each other in turn.

With prefix caching, a request admitted without blocks first takes the cached blocks of its longest
computed prefix (whole blocks, at most all tokens but the last: that one's logits are needed) and
computes from there; every block a step completes is registered for later requests.

Speculative decoding: `schedule(drafts)` turns a running request's decode into a speculative row
of 1 + d query tokens (its last token and d drafts) when the token budget and free blocks allow
(never by preempting: without room it decodes one token as usual). The row rides in `prefills`
(a chunk with cached context, which is what it is to attention) and its drafts in `spec`. The
blocks for all 1 + d slots stay with the request whatever it accepts: slots of rejected drafts
are past `num_computed_tokens`, so the next steps overwrite them before anything reads them, and
no block is registered in the prefix cache before its every slot holds verified KV.

Sliding windows (`window`: set when every layer of the model is windowed): before a running or
admitted request is given blocks, the blocks that slid out of the window of all its later queries
are freed (sliding_window.py), so a request holds about (window + chunk) / block_size + 1 blocks
however long it runs. Not while its KV connector has a transfer of it pending (`serves`: a
prefill-side request sends its whole prompt's blocks, a decode-side one receives into them).
"""

from __future__ import annotations

import itertools
import time
from bisect import insort
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.config import SchedulerConfig
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.prefix_cache import block_hashes
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sliding_window import WindowReclaimer


class SchedulerConnector(Protocol):
    """The KV-transfer seam on the scheduler side (implemented in pdserve.kv)."""

    def poll(self) -> tuple[set[str], dict[str, str]]:
        """Ids whose remote KV has landed, and ids whose transfer failed (id -> reason)."""
        ...

    def on_request_finished(self, request: Request) -> bool:
        """Called when a request finishes. True: the connector keeps its blocks and frees them later."""
        ...

    def serves(self, request_id: str) -> bool:
        """Whether a KV transfer of the request is pending (its blocks must stay whole). Only asked with `window`."""
        ...


@dataclass
class ScheduledBatch:
    """What one step computes: `decodes` get one token each; `prefills` (request, num_tokens);
    `spec`: request id -> the drafts of a speculative row (in `prefills` with 1 + len(drafts) tokens)."""

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    spec: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_pool: BlockPool,
        block_size: int,
        connector: SchedulerConnector | None = None,
        prefix_caching: bool = False,
        window: int | None = None,
    ) -> None:
        """`window`: the model's ModelConfig.kv_window (None: no layer lets KV slide out of sight);
        with it, blocks out of the window are freed early, their table slots on the pool's padding block."""
        self.config = config
        self.pool = block_pool
        self.block_size = block_size
        self.connector = connector
        self.prefix_caching = prefix_caching
        self.by_priority = config.policy == "priority"
        self._arrivals = itertools.count()
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache, lifetime
        self.prefix_cache_hits = 0  # of which found computed
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # lifetime total, for metrics and tests
        self._ended: list[Request] = []  # finished outside a step (failed transfers), not yet reported
        self.reclaimer = None if window is None else \
            WindowReclaimer(block_pool, block_size, window, block_pool.padding_block())

    # ---- admission and removal -------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        request.arrival_seq = next(self._arrivals)
        self.requests[request.request_id] = request
        self._enqueue(request)

    @staticmethod
    def rank(request: Request) -> tuple[int, float, int]:
        """The priority policy's order, lower first: priority, then arrival."""
        return request.priority, request.arrival_time, request.arrival_seq

    def _enqueue(self, req: Request, preempted: bool = False) -> None:
        """Into the waiting queue: at its rank (priority), else at the back, or the front when preempted."""
        if self.by_priority:
            insort(self.waiting, req, key=self.rank)
        elif preempted:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def _start_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        if not req.scheduled_time:  # the first admission (vLLM's SCHEDULED event; preemptions ignored)
            req.scheduled_time = time.monotonic()
        if self.by_priority:
            insort(self.running, req, key=self.rank)
        else:
            self.running.append(req)

    def allocate_for_remote(self, request: Request) -> bool:
        """Give a remote-KV request blocks for its whole prompt up front (decode side). With prefix
        caching its leading blocks may come from our cache: `num_computed_tokens` then counts the
        tokens they hold, and only the blocks after them need the remote KV."""
        looked_up = self._take_cached_prefix(request)
        need = self._blocks_needed(request, request.num_prompt_tokens)
        if not self.pool.can_allocate(need):
            if looked_up:
                self._give_back_prefix(request)
            return False
        if looked_up:
            self._count_lookup(request)
        request.block_ids.extend(self.pool.allocate(need))
        return True

    def finish(self, request_id: str, status: RequestStatus, error: str | None = None) -> Request | None:
        """End a request now (abort, stop string, error); frees its blocks unless the connector keeps them."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finalize(req, status, error)
        return req

    def _finalize(self, req: Request, status: RequestStatus, error: str | None = None) -> None:
        req.status = status
        req.error = error
        del self.requests[req.request_id]
        keep = self.connector is not None and self.connector.on_request_finished(req)
        if not keep:
            self.release_blocks(req)

    def release_blocks(self, req: Request) -> None:
        """Free every block the request holds (not those freed early) and clear its table."""
        if req.block_ids:
            # Tail first: a prefix's last blocks are the first evicted, its shared head stays longest.
            self.pool.free(reversed(req.held_block_ids))
            req.block_ids = []
            req.num_freed_blocks = 0

    @property
    def num_window_freed_blocks(self) -> int:
        """Blocks freed early because they slid out of the attention window, lifetime."""
        return 0 if self.reclaimer is None else self.reclaimer.num_freed

    def _reclaim_out_of_window(self, req: Request) -> None:
        """Free the request's blocks that no later query of it sees (sliding-window models), unless
        a KV transfer of it is pending: it moves the whole prompt's blocks."""
        if self.reclaimer is not None and not (self.connector is not None and self.connector.serves(req.request_id)):
            self.reclaimer.reclaim(req)

    # ---- prefix cache ----------------------------------------------------------------------
    def _take_cached_prefix(self, req: Request) -> bool:
        """Start a request without blocks at its longest cached prefix; False when it was not
        looked up. Prompt logprobs need every prompt position's logits, mean pooling every prompt
        token's hidden state: those compute everything."""
        if not self.prefix_caching or req.sampling_params.prompt_logprobs is not None or \
                (req.pooling is not None and req.pooling.needs_every_token):
            return False
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits = self.pool.cached_prefix(block_hashes(req, self.block_size, max_blocks))
        self.pool.take_cached(hits)
        req.block_ids = hits
        req.num_computed_tokens = len(hits) * self.block_size
        return True

    def _give_back_prefix(self, req: Request) -> None:
        """Undo `_take_cached_prefix` (the rest did not fit); it is looked up again next time."""
        self.release_blocks(req)
        req.num_computed_tokens = 0

    def _count_lookup(self, req: Request) -> None:
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += req.num_computed_tokens

    def _register_computed(self, req: Request, first: int) -> None:
        """Register the full blocks from index `first` on whose KV is now computed."""
        n = req.num_computed_tokens // self.block_size
        first = max(first, req.num_freed_blocks)
        if n > first:
            hashes = block_hashes(req, self.block_size, n)
            for i in range(first, n):
                self.pool.register(req.block_ids[i], hashes[i])

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step ------------------------------------------------------------------------
    def _blocks_needed(self, req: Request, num_tokens_total: int) -> int:
        return max(0, -(-num_tokens_total // self.block_size) - len(req.block_ids))

    def _try_allocate(self, req: Request, num_new: int) -> bool:
        need = self._blocks_needed(req, req.num_computed_tokens + num_new)
        if not self.pool.can_allocate(need):
            return False
        req.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.release_blocks(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(victim, preempted=True)
        batch.preempted.append(victim)

    def _victims_for(self, req: Request, num_new: int, spared: set[int]) -> list[Request] | None:
        """Priority policy: the running requests that rank after waiting `req` whose preemption
        (worst first) frees the blocks it needs for `num_new` tokens; None when all of them would
        not. Shared (cached) blocks count as freed only once every holder among them lets go.
        Requests whose id() is in `spared` (admitted in this step) are not taken."""
        need = self._blocks_needed(req, req.num_computed_tokens + num_new)
        free = self.pool.num_free
        released: dict[int, int] = {}
        victims: list[Request] = []
        rank = self.rank(req)
        for victim in reversed(self.running):  # worst first
            if free >= need or self.rank(victim) < rank:
                break
            if id(victim) in spared:
                continue
            victims.append(victim)
            for b in victim.held_block_ids:
                released[b] = released.get(b, 0) + 1
                if released[b] == self.pool.ref_count(b):
                    free += 1
        return victims if free >= need else None

    @staticmethod
    def _unschedule(batch: ScheduledBatch, req: Request) -> int:
        """Take `req` out of this step's batch; the number of tokens it had there."""
        batch.spec.pop(req.request_id, None)
        if req in batch.decodes:
            batch.decodes.remove(req)
            return 1
        for i, (r, n) in enumerate(batch.prefills):
            if r is req:
                del batch.prefills[i]
                return n
        return 0

    def poll_connector(self) -> None:
        """Let the KV connector report landed / failed transfers (also called when idle)."""
        if self.connector is None:
            return
        ready, failed = self.connector.poll()
        for rid, reason in failed.items():
            req = self.requests.get(rid)
            if req is not None and req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                self.waiting.remove(req)
                self._finalize(req, RequestStatus.FINISHED_ERROR, reason)
                self._ended.append(req)
        for rid in ready:
            req = self.requests.get(rid)
            if req is not None and req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                # The prompt's KV is in our blocks: only the last prompt token is recomputed to
                # produce the first sampled token's logits.
                req.num_computed_tokens = req.num_prompt_tokens - 1
                req.status = RequestStatus.WAITING
                if self.prefix_caching:  # the landed KV serves later local requests too
                    self._register_computed(req, 0)

    def pop_ended(self) -> list[Request]:
        ended, self._ended = self._ended, []
        return ended

    def schedule(self, drafts: Mapping[str, Sequence[int]] | None = None) -> ScheduledBatch:
        """The next step's batch. `drafts`: proposed draft tokens of running requests that are
        decoding (by id); each is scheduled as a speculative row when budget and blocks allow."""
        self.poll_connector()
        batch = ScheduledBatch()
        drafts = drafts or {}
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []

        # 1. Running requests in order (fcfs: oldest first; priority: by rank); the last one (fcfs:
        #    the newest; priority: the worst ranked) is preempted when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            self._reclaim_out_of_window(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new == 1 and req.request_id in drafts and self._schedule_speculative(
                    batch, req, drafts[req.request_id], budget):
                budget -= batch.prefills[-1][1]
                i += 1
                continue
            if -(-(req.num_computed_tokens + num_new) // self.block_size) - req.num_freed_blocks > self.pool.num_usable:
                # The blocks its context needs (less those freed early) outgrew the whole cache: it
                # would only preempt itself for ever.
                self.running.remove(req)
                self._finalize(req, RequestStatus.FINISHED_LENGTH)
                self._ended.append(req)
                continue
            while not self._try_allocate(req, num_new):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req preempted itself: nothing newer left to take blocks from
            scheduled.append(req)
            self._add_to_batch(batch, req, num_new)
            budget -= num_new
            i += 1

        # 2. Waiting requests: first those that hold their blocks already (remote KV landed), then
        #    the rest in queue order. After a preemption the cache is full: fcfs admits nobody;
        #    priority only requests that rank before every victim of this step (a victim readmitted
        #    at once would be preempted again, a request after it would take the victim's blocks).
        if not batch.preempted or self.by_priority:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_speculative(self, batch: ScheduledBatch, req: Request, drafts: Sequence[int], budget: int) -> bool:
        """Schedule decoding `req` with as many of `drafts` as the budget leaves room for, if the
        blocks for their slots are free; False (nothing scheduled) otherwise."""
        d = min(len(drafts), budget - 1)
        if d < 1 or req.num_tokens - req.num_computed_tokens != 1 or not self._try_allocate(req, 1 + d):
            return False
        batch.prefills.append((req, 1 + d))
        batch.spec[req.request_id] = list(drafts[:d])
        return True

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Step 2: admit waiting requests into `batch` with what is left of the token `budget`."""
        cutoff = min((self.rank(v) for v in batch.preempted), default=None)
        admitted: set[int] = set()
        for req in sorted(self.waiting, key=lambda r: not r.block_ids):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                continue
            if cutoff is not None and self.rank(req) >= cutoff:
                continue
            had_blocks = bool(req.block_ids)
            looked_up = not had_blocks and self._take_cached_prefix(req)
            self._reclaim_out_of_window(req)
            num_new = req.num_tokens - req.num_computed_tokens
            fits = num_new <= budget or self.config.enable_chunked_prefill
            num_new = min(num_new, budget)
            allocated = fits and self._try_allocate(req, num_new)
            if fits and not allocated and self.by_priority:
                victims = self._victims_for(req, num_new, admitted)
                if victims:
                    for victim in victims:
                        budget += self._unschedule(batch, victim)
                        self._preempt(victim, batch)
                    best = self.rank(victims[-1])  # victims come worst first
                    cutoff = best if cutoff is None else min(cutoff, best)
                    allocated = self._try_allocate(req, num_new)
                    assert allocated, "the victims were to free enough blocks"
            if not allocated:
                if looked_up:
                    self._give_back_prefix(req)
                if fits and (had_blocks or not self.running):
                    continue  # a later, smaller request may still fit; nothing waits on this one
                break
            if looked_up:
                self._count_lookup(req)
                if req.num_preemptions == 0:  # usage reports what the first admission found
                    req.num_cached_tokens = req.num_computed_tokens
            admitted.add(id(req))
            self._start_running(req)
            self._add_to_batch(batch, req, num_new)
            budget -= num_new
        if admitted:
            self.waiting = deque(r for r in self.waiting if id(r) not in admitted)

    @staticmethod
    def _add_to_batch(batch: ScheduledBatch, req: Request, num_new: int) -> None:
        # A single new token is a decode, whatever the phase: one query against the cached context.
        # Except a one-token chunk inside a prompt whose logprobs are asked: the runner computes
        # prompt logprobs from prefill chunks only; and a pooling request: the runner pools those only.
        in_prompt = req.num_computed_tokens + 1 < req.num_prompt_tokens
        if num_new == 1 and req.pooling is None and not (in_prompt and req.sampling_params.prompt_logprobs is not None):
            batch.decodes.append(req)
        else:
            batch.prefills.append((req, num_new))

    def update_after_step(
        self, batch: ScheduledBatch, sampled: dict[str, int], accepted: Mapping[str, Sequence[int]] | None = None,
    ) -> list[tuple[Request, int]]:
        """Advance computed counts, append sampled tokens of caught-up requests, finish those that
        stopped. `sampled` maps request id -> token for every request in the batch (a speculative
        row's: the token after its accepted drafts); `accepted`: a speculative row's accepted
        drafts. Returns each request that received tokens this step with how many (several for a
        speculative row: cut at the first that stops it), and the pooling requests that finished
        (their prompt computed: the runner pooled it; their sample is discarded), with 0."""
        advanced: list[tuple[Request, int]] = []
        accepted = accepted or {}
        for req, n in [(r, 1) for r in batch.decodes] + batch.prefills:
            if req.is_finished or req.status != RequestStatus.RUNNING:
                continue
            if req.request_id in batch.spec:
                emitted = [*accepted.get(req.request_id, ()), sampled[req.request_id]]
                advanced.append((req, self._advance_speculative(req, emitted)))
                continue
            req.num_computed_tokens += n
            if self.prefix_caching:
                self._register_computed(req, (req.num_computed_tokens - n) // self.block_size)
            if req.num_computed_tokens < req.num_tokens:
                continue  # a partial prefill chunk: its sample is discarded
            if req.pooling is not None:
                self.running.remove(req)
                self._finalize(req, RequestStatus.FINISHED_STOPPED)
                advanced.append((req, 0))
                continue
            req.output_token_ids.append(sampled[req.request_id])
            advanced.append((req, 1))
            stop = req.check_stop()
            if stop is not None:
                self.running.remove(req)
                self._finalize(req, stop)
        return advanced

    def _advance_speculative(self, req: Request, emitted: list[int]) -> int:
        """Append a speculative row's `emitted` tokens up to the first that stops the request; the
        positions they follow (the row's first token and the kept drafts) now hold verified KV.
        Returns how many were appended."""
        stop = None
        kept = 0
        for token in emitted:
            req.output_token_ids.append(token)
            kept += 1
            stop = req.check_stop()
            if stop is not None:
                break
        req.num_computed_tokens += kept
        if self.prefix_caching:
            self._register_computed(req, (req.num_computed_tokens - kept) // self.block_size)
        if stop is not None:
            self.running.remove(req)
            self._finalize(req, stop)
        return kept

    def check_integrity(self) -> None:
        """Blocks held by live requests plus free blocks account for the whole pool; only cached
        blocks are shared, and each holder counts one reference."""
        self.pool.check_integrity()
        holders: dict[int, int] = {}
        for r in self.requests.values():
            if r.num_freed_blocks:
                assert self.reclaimer is not None, f"request {r.request_id} freed blocks early without a window"
                assert r.block_ids[: r.num_freed_blocks] == [self.reclaimer.padding] * r.num_freed_blocks, \
                    f"request {r.request_id}'s early-freed slots do not name the padding block"
            for b in r.held_block_ids:
                holders[b] = holders.get(b, 0) + 1
        assert self.reclaimer is None or self.reclaimer.padding not in holders, "a request holds the padding block"
        for b, n in holders.items():
            assert self.pool.ref_count(b) >= n, f"block {b} has {n} holders but fewer references"
            assert n == 1 or self.pool.is_cached(b), f"uncached block {b} is owned by {n} requests"
        if self.by_priority:
            for queue in (list(self.waiting), self.running):
                ranks = [self.rank(r) for r in queue]
                assert ranks == sorted(ranks), "the priority policy keeps its queues in rank order"
