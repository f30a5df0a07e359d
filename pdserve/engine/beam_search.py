"""Beam search as vLLM runs it, above the engine: pure state, driven one step at a time.

Every step each live beam is sent as a prompt of its own (prompt plus the beam's tokens so far) for
one token with the `2 * beam_width` likeliest next tokens' logprobs (the prefix cache makes the
shared prefix free). Each such token (and the one the step sampled, when it is not among them)
extends its beam into a candidate whose cumulative logprob is the beam's plus the token's. A
candidate ending in an end-of-sequence token (unless `ignore_eos`) is completed ("stop"); of the
others the `beam_width` most likely live on. After `max_tokens` steps (or when no beam lives) the
completed and the live beams ("length") are ranked by `beam_search_score` — the cumulative logprob
over the sequence length, prompt included, to the power `length_penalty`
(vLLM's `get_beam_search_score`, after Hugging Face's) — and the best `beam_width` are the result.

With vLLM's `allowed_token_ids` every candidate is an allowed token: each step's logprobs are the
likeliest allowed tokens' (the model's own logprobs, not renormalized over the allowed set, so
beams compare as without the restriction) and the sampled token is one of them.

Drivers: `engine/beam_driver.py` (offline `LLM.beam_search`), `server/beam_search.py` (the
OpenAI endpoints' `use_beam_search`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.engine.logprobs import TokenLogprob
from pdserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams

# Each step asks for 2 * beam_width logprobs, and a request may ask for MAX_LOGPROBS at most
# (vLLM's --max-logprobs default, 20, limits its beam width the same way).
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's `BeamSearchParams`. ValueError naming the field when out of range."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # of the one token each step samples (a candidate too); logprobs are the model's own
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # keep the end-of-sequence token in a completed beam's token ids
    # vLLM's allowed_token_ids: each beam's candidates are the likeliest of these (a tuple once constructed).
    allowed_token_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in self.allowed_token_ids))
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty (None allows every token)")
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(
                f"beam_width must be in [1, {MAX_BEAM_WIDTH}] (each step asks for 2 * beam_width "
                f"logprobs, at most {MAX_LOGPROBS}), got {self.beam_width}"
            )
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")

    @property
    def num_candidates(self) -> int:
        """The likeliest next tokens each step looks at, per beam (Hugging Face's 2 * beam width)."""
        return 2 * self.beam_width

    def step_params(
        self, logprobs: int = 0, prompt_logprobs: int | None = None, seed: int | None = None
    ) -> SamplingParams:
        """The engine request of one beam's step: one token, the candidates' logprobs (at least
        `logprobs`, when the caller shows that many alternatives), the prompt's when asked. Under
        allowed_token_ids the token is one of them and so are the alternatives: the likeliest
        allowed tokens, each with the model's own logprob."""
        return SamplingParams(
            max_tokens=1,
            temperature=self.temperature,
            seed=seed,
            logprobs=max(self.num_candidates, logprobs),
            prompt_logprobs=prompt_logprobs,
            allowed_token_ids=self.allowed_token_ids,
            top_logprobs_within_allowed=self.allowed_token_ids is not None,
        )


@dataclass
class BeamSearchSequence:
    """vLLM's: one beam. `tokens` include the prompt (its first `num_prompt_tokens`) and, for a
    beam that ended with one, the end-of-sequence token; `logprobs` has one entry per generated
    token (its logprob and rank, and the step's likeliest tokens in `top`)."""

    tokens: list[int]
    num_prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None  # set by the driver for the result
    finish_reason: str | None = None  # "stop" (an end-of-sequence token) or "length"
    stop_reason: int | None = None  # the end-of-sequence token that completed it

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens (an ending end-of-sequence token included)."""
        return self.tokens[self.num_prompt_tokens :]

    def shown_token_ids(self, include_stop: bool) -> list[int]:
        """The generated tokens as an API response shows them: a completed beam's end-of-sequence
        token only with `include_stop` (vLLM's include_stop_str_in_output)."""
        out = self.output_token_ids
        return out if include_stop or self.stop_reason is None else out[:-1]

    def extended(self, token: TokenLogprob) -> BeamSearchSequence:
        return BeamSearchSequence(
            self.tokens + [token.token_id],
            self.num_prompt_tokens,
            self.logprobs + [token],
            self.cum_logprob + token.logprob,
        )


@dataclass
class BeamSearchOutput:
    """vLLM's: the best `beam_width` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search_score(
    tokens: Sequence[int], cum_logprob: float, eos_token_ids: Collection[int], length_penalty: float = 1.0
) -> float:
    """vLLM's `get_beam_search_score`: `cum_logprob / len ** length_penalty`, the length counting the
    prompt and not a final end-of-sequence token. Higher is better; a larger penalty favours longer
    sequences (their negative sums are divided by more)."""
    length = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    try:
        return cum_logprob / (length**length_penalty)
    except OverflowError:  # len ** penalty beyond a float (a huge penalty): the quotient's limit, -0.0
        return cum_logprob * 0.0
    except ZeroDivisionError:  # len ** penalty underflowed to 0 (a huge negative penalty)
        return -math.inf if cum_logprob < 0 else 0.0


def candidates(step: TokenLogprob, k: int) -> list[TokenLogprob]:
    """The tokens one beam's step offers: its `k` likeliest (in rank order), then the sampled token
    when it is not among them (vLLM's logprobs always hold the sampled token). Each as the
    TokenLogprob its beam records: its own logprob and rank, all of the step's alternatives."""
    likeliest = step.top[:k]
    out = [TokenLogprob(t, lp, rank, step.top) for rank, (t, lp) in enumerate(likeliest, start=1)]
    if all(t != step.token_id for t, _ in likeliest):
        out.append(step)
    return out


class BeamSearch:
    """One prompt's search. `live` are the beams to send this step; `advance` takes their next-token
    logprobs (one per live beam, in order); once `done`, `result()` ranks what was found."""

    def __init__(self, prompt_token_ids: Sequence[int], params: BeamSearchParams, eos_token_ids: Iterable[int]):
        self.params = params
        self.eos = frozenset(eos_token_ids)
        self.live = [BeamSearchSequence(list(prompt_token_ids), len(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= self.params.max_tokens

    def advance(self, steps: Sequence[TokenLogprob]) -> None:
        """One step: every live beam extended by each of its candidates; those that end with an
        end-of-sequence token are completed, the `beam_width` likeliest others live on (ties: the
        earlier beam, then the likelier rank, first)."""
        if len(steps) != len(self.live):
            raise ValueError(f"{len(self.live)} live beams but {len(steps)} steps")
        growing: list[BeamSearchSequence] = []
        for beam, step in zip(self.live, steps, strict=True):
            for token in candidates(step, self.params.num_candidates):
                new = beam.extended(token)
                if token.token_id in self.eos and not self.params.ignore_eos:
                    new.finish_reason, new.stop_reason = "stop", token.token_id
                    self.completed.append(new)
                else:
                    growing.append(new)
        growing.sort(key=lambda b: b.cum_logprob, reverse=True)  # stable
        self.live = growing[: self.params.beam_width]
        self.steps += 1

    def score(self, beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, self.eos, self.params.length_penalty)

    def result(self) -> list[BeamSearchSequence]:
        """The best `beam_width` of the completed and the live beams by score, best first (ties: the
        completed, in the order they completed, then the live); live ones end with "length"."""
        for beam in self.live:
            beam.finish_reason = "length"
        ranked = sorted(self.completed + self.live, key=self.score, reverse=True)
        return ranked[: self.params.beam_width]
