"""A request's life inside one engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # the scheduler's side stays free of torch
    from pdserve.engine.bad_words import BadWords
    from pdserve.engine.logprobs import TokenLogprob


class RequestStatus(enum.IntEnum):
    """Ordered: a request is finished exactly when its status is greater than PREEMPTED."""

    WAITING = 0
    WAITING_FOR_REMOTE_KVS = 1
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    arrival_time: float = field(default_factory=time.monotonic)  # queued in the engine
    scheduled_time: float = 0.0  # first admitted into the running batch (0: not yet); for metrics
    priority: int = 0  # the priority policy serves lower values first (vLLM's); fcfs ignores it
    arrival_seq: int = 0  # set by Scheduler.add: breaks ties of arrival_time by add order
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Its block table, one entry per block of context from position 0. The first `num_freed_blocks`
    # entries (sliding-window models: blocks freed once out of every layer's window) are the pool's
    # padding block, not held by the request.
    block_ids: list[int] = field(default_factory=list)
    num_freed_blocks: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Opaque to the scheduler; owned by the KV connector (typed there).
    kv_transfer_params: object | None = None
    error: str | None = None
    num_preemptions: int = 0
    # SamplingParams.prompt_logprobs: entries for prompt tokens 1.. as their positions are computed
    # (a recompute after preemption does not add them again).
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Prefix caching: content hashes of full blocks (prefix_cache.block_hashes), and how many prompt
    # tokens the first admission found computed in the cache (reported as usage's cached_tokens).
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    lora: LoRARequest | None = None  # the adapter it runs with (engine/lora.py)
    # An embedding request (its pooling type resolved): it ends with its prompt, pooled, not sampled.
    pooling: PoolingParams | None = None
    # vLLM's: requests share prefix-cache blocks only with requests of the same salt (prefix_cache.py).
    cache_salt: str | None = None
    bad_words: BadWords | None = None  # SamplingParams.bad_words, tokenized (engine/bad_words.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def held_block_ids(self) -> list[int]:
        """The blocks the request holds a reference to (its table minus the early-freed head)."""
        return self.block_ids[self.num_freed_blocks :]

    @property
    def max_output_tokens(self) -> int:
        limit = self.max_model_len - self.num_prompt_tokens
        mt = self.sampling_params.max_tokens
        return limit if mt is None else min(mt, limit)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output."""
        np_ = self.num_prompt_tokens
        if end <= np_:
            return self.prompt_token_ids[start:end]
        if start >= np_:
            return self.output_token_ids[start - np_ : end - np_]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - np_]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def check_stop(self) -> RequestStatus | None:
        """Status to finish with after the newest token, or None to go on (stop strings: engine)."""
        sp = self.sampling_params
        n_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in sp.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n_out >= self.max_output_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
