"""Per-request sampling parameters (vLLM-shaped)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

from pdserve.engine.truncation import check_truncate_prompt_tokens

MAX_LOGPROBS = 20  # most top alternatives a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class StructuredOutputs:
    """Constrain the output to a language (vLLM's structured outputs): exactly one of a JSON schema
    (as JSON text), any JSON object, a regular expression, one of several strings, or a Lark grammar.
    Compiled and enforced by engine/structured.py."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice:
                raise ValueError("choice needs at least one string")
        given = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(given) != 1:
            raise ValueError("structured outputs take exactly one of json, json_object, regex, choice, grammar")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction (ValueError naming the field)."""

    max_tokens: int | None = 16  # None: up to the model's maximum length
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p times the most likely one; 0: off
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # offline API: choices per prompt (the server fans out `n` itself, one engine request each)
    logprobs: int | None = None  # None: none; k: each sampled token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (vLLM's)
    # OpenAI's: logit -= presence * [token in output] + frequency * (its count in the output).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's (from CTRL): a token seen in the prompt or the output has its logit divided by this
    # when positive, multiplied when negative. 1: off.
    repetition_penalty: float = 1.0
    # OpenAI's: added to these tokens' logits before sampling, (token id, bias in [-100, 100]).
    logit_bias: Sequence[tuple[int, float]] | Mapping[int, float] = ()
    structured_outputs: StructuredOutputs | None = None
    # vLLM's: keep only the prompt's last k tokens (engine/truncation.py); -1: as many as the
    # context leaves room for next to max_tokens; None: all.
    truncate_prompt_tokens: int | None = None
    # vLLM's: the stop string that ended the output stays at its end (streamed too).
    include_stop_str_in_output: bool = False
    # vLLM's: sample only these token ids (None: any; never empty).
    allowed_token_ids: Sequence[int] | None = None
    # pdserve's, for beam search (engine/beam_search.py): the `logprobs` alternatives are the
    # likeliest of allowed_token_ids (each with the model's own logprob), not of the vocabulary.
    top_logprobs_within_allowed: bool = False
    # vLLM's: words the output never continues into (engine/bad_words.py); a tuple once constructed.
    bad_words: Sequence[str] | None = ()
    # vLLM's: with skip_special_tokens False, False renders an added token that follows another
    # without the separator the tokenizer's decoder may put between them (model/tokenizer.py).
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so the object stays hashable and immutable.
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")  # torch.Generator's range
        check_truncate_prompt_tokens(self.truncate_prompt_tokens)
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in self.allowed_token_ids))
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty (None allows every token)")
        object.__setattr__(self, "bad_words", (self.bad_words,) if isinstance(self.bad_words, str)
                           else tuple(self.bad_words or ()))
        if any(not w.strip() for w in self.bad_words):  # type: ignore[union-attr]
            raise ValueError("bad_words must each have a character other than whitespace")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def uses_top_p(self) -> bool:
        return self.top_p < 1.0

    @property
    def uses_min_p(self) -> bool:
        return self.min_p > 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


# generation_config.json keys that set a sampling default (vLLM's --generation-config auto), and
# the SamplingParams field each one sets.
GENERATION_CONFIG_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling values a request gets where it leaves the field out: a model's recommended ones
    (its generation_config.json, e.g. Qwen3's temperature 0.6, top_p 0.95, top_k 20) and the
    operator's overrides. None: SamplingParams' own default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None

    @classmethod
    def from_generation_config(cls, generation: Mapping[str, object]) -> SamplingDefaults:
        """The sampling keys of a generation_config.json (or of an override in that shape); ValueError
        on a key that is not one, or a value that SamplingParams would refuse."""
        unknown = sorted(set(generation) - set(GENERATION_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown generation config keys {unknown}; known: {', '.join(GENERATION_CONFIG_KEYS)}")
        values = {GENERATION_CONFIG_KEYS[k]: v for k, v in generation.items() if v is not None}
        defaults = cls(**values)  # type: ignore[arg-type]
        defaults.params()  # validates
        return defaults

    def merged(self, overrides: SamplingDefaults) -> SamplingDefaults:
        """These defaults with every value `overrides` sets replaced."""
        return replace(self, **overrides.as_dict())

    def as_dict(self) -> dict[str, float | int]:
        """The values set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def fill(self, **request: float | int | None) -> dict[str, float | int | None]:
        """The request's values, each None replaced by the default where one is set."""
        return {k: getattr(self, k) if v is None and getattr(self, k) is not None else v for k, v in request.items()}

    def params(self) -> SamplingParams:
        """SamplingParams with these defaults (SamplingParams' own elsewhere)."""
        return SamplingParams(**self.as_dict())  # type: ignore[arg-type]
