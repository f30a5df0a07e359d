"""What the engine hands back: per-step deltas (streaming) and whole results (offline API)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.logprobs import TokenLogprob


@dataclass(frozen=True)
class StepOutput:
    """New tokens of one request after one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (here, or by the prefill)
    error: str | None = None
    kv_transfer_params: object | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asks
    # With the first token, when the request asks: prompt tokens 1.. (the first has none).
    prompt_logprobs: list[TokenLogprob] | None = None
    embedding: list[float] | None = None  # an embedding request's vector, on its final output
    # On the final output of a request the engine ran (time.monotonic()): when it was queued in the
    # engine and first scheduled (0.0: never), for vLLM's queue / prefill / inference intervals.
    queued_time: float | None = None
    scheduled_time: float = 0.0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, when SamplingParams.logprobs is set


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # SamplingParams.prompt_logprobs: None for the first prompt token, then one per prompt token.
    prompt_logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class EmbeddingOutput:
    """`LLM.embed`'s result for one prompt; the vector is also at `.outputs.embedding`, where
    vLLM's code reads it."""

    request_id: str
    prompt_token_ids: list[int]
    embedding: list[float]
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def outputs(self) -> EmbeddingOutput:
        return self
