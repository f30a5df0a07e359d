"""vLLM's `truncate_prompt_tokens`: keep only a prompt's last k tokens (left truncation), applied to
its token ids (a text prompt's after tokenization, a chat's after its template), before the
context-length checks. -1 keeps as many as the context leaves room for next to the output."""

from __future__ import annotations


def check_truncate_prompt_tokens(value: int | None) -> None:
    """ValueError unless `value` is None, -1 or at least 1 (as vLLM's SamplingParams)."""
    if value is not None and (value == 0 or value < -1):
        raise ValueError(f"truncate_prompt_tokens must be an integer >= 1 or -1, got {value}")


def truncate_prompt(
    token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int, reserved: int
) -> list[int]:
    """`token_ids` cut to their last `truncate_prompt_tokens` (None: as they are). The prompt may
    take the context less the `reserved` output tokens (max_tokens; 0 for an embedding): -1 keeps
    that many, and a larger k is a ValueError (as vLLM's). With no room left at all the ids are
    returned as they are, for the context-length check to refuse."""
    k = truncate_prompt_tokens
    room = max_model_len - reserved
    if k is None or room < 1:
        return token_ids
    if k == -1:
        k = room
    elif k > room:
        less = f" less {reserved} output tokens (max_tokens)" if reserved else ""
        raise ValueError(
            f"truncate_prompt_tokens={k} cannot be greater than {room}: this model's maximum context "
            f"length of {max_model_len}{less}; request a smaller truncation size"
        )
    return token_ids[-k:] if len(token_ids) > k else token_ids
