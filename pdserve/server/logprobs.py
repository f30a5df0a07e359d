"""Engine logprobs (`TokenLogprob`) in the two OpenAI response shapes.

Each token is shown as its own decoded text (special tokens included); `bytes` (chat) are that
text's UTF-8 bytes. A byte-level token that is only part of a character decodes to U+FFFD, as in
vLLM's responses. With vLLM's `return_tokens_as_token_ids` (`as_ids`) a token is shown as
"token_id:{id}" instead (and its `bytes` are those of that string, as vLLM's); completions'
`text_offset` still counts the decoded text (it indexes the completion's `text`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pdserve.engine.logprobs import TokenLogprob
from pdserve.model.tokenizer import Tokenizer
from pdserve.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)

MIN_LOGPROB = -9999.0  # JSON has no -inf: a token a grammar (or a ban) made impossible reads so (OpenAI's, vLLM's)


def _text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _shown(tok: Tokenizer, token_id: int, as_ids: bool) -> str:
    """How a logprob's token is shown: its text, or "token_id:{id}" (vLLM's return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_ids else _text(tok, token_id)


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(
    tok: Tokenizer, lps: Sequence[TokenLogprob], text_offset: int, as_ids: bool = False
) -> CompletionLogprobs:
    """`text_offset`: where the first of these tokens starts in the completion's text."""
    out = CompletionLogprobs()
    for lp in lps:
        s = _shown(tok, lp.token_id, as_ids)
        out.tokens.append(s)
        out.token_logprobs.append(_finite(lp.logprob))
        # As OpenAI's: the sampled token is listed among the alternatives too (k+1 entries at most).
        # Distinct tokens can share a text (byte pieces of one character): the likelier one is kept.
        alternatives: dict[str, float] = {}
        for t, v in lp.top:
            alternatives.setdefault(_shown(tok, t, as_ids), _finite(v))
        alternatives.setdefault(s, _finite(lp.logprob))
        out.top_logprobs.append(alternatives)
        out.text_offset.append(text_offset)
        text_offset += len(_text(tok, lp.token_id)) if as_ids else len(s)
    return out


def echo_logprobs(
    tok: Tokenizer, prompt_ids: Sequence[int], lps: Sequence[TokenLogprob], as_ids: bool = False
) -> CompletionLogprobs:
    """The prompt's part of an echoed completion: its first token has no logprob (nothing before
    it), the others `lps` (SamplingParams.prompt_logprobs)."""
    first = _shown(tok, prompt_ids[0], as_ids)
    head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    return head + completion_logprobs(tok, lps, len(_text(tok, prompt_ids[0])), as_ids)


def _top(tok: Tokenizer, token_id: int, logprob: float, as_ids: bool) -> TopLogprob:
    s = _shown(tok, token_id, as_ids)
    return TopLogprob(token=s, logprob=_finite(logprob), bytes=list(s.encode()))


def chat_logprobs(tok: Tokenizer, lps: Sequence[TokenLogprob], as_ids: bool = False) -> ChatLogprobs:
    content = []
    for lp in lps:
        head = _top(tok, lp.token_id, lp.logprob, as_ids)
        tops = [_top(tok, t, v, as_ids) for t, v in lp.top]
        content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)


def top_k(lps: Sequence[TokenLogprob], k: int) -> list[TokenLogprob]:
    """`lps` with at most `k` alternatives each (the engine computed one k for two uses)."""
    return [lp if len(lp.top) <= k else dataclasses.replace(lp, top=lp.top[:k]) for lp in lps]


def prompt_logprobs(tok: Tokenizer, lps: Sequence[TokenLogprob], k: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: None for the first prompt token (nothing before it), then for each
    of `lps` (SamplingParams.prompt_logprobs) the prompt token's own entry and the `k` likeliest
    tokens', keyed by token id (k + 1 entries, k when the prompt token is among the likeliest)."""
    out: PromptLogprobs = [None]
    for lp in lps:
        entries = {str(lp.token_id): PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank,
                                                   decoded_token=_text(tok, lp.token_id))}
        for rank, (t, v) in enumerate(lp.top[:k], start=1):
            entries.setdefault(str(t), PromptLogprob(logprob=_finite(v), rank=rank, decoded_token=_text(tok, t)))
        out.append(entries)
    return out
