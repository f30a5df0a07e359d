"""Per-request output text: incremental detokenization plus stop strings.

Text that might be the start of a stop string is held back until it is known not to be, so a
stream never shows a stop string (vLLM's default: stop strings are not included in the output).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.model.tokenizer import IncrementalDetokenizer, Tokenizer


class TextState:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], skip_special_tokens: bool = True) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""  # decoded so far (truncated at a stop string once one is hit)
        self._emitted = 0
        self._stopped = False

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text safe to emit now, whether a stop string was hit)."""
        if self._stopped:
            return "", True
        start = max(0, len(self._text) - self._hold)
        self._text += self._detok.add([token_id])
        if self._stop:
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                self._stopped = True
                return self._take(len(self._text)), True
        return self._take(len(self._text) - self._hold), False

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        out = self._text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """The rest of the text (end of the request)."""
        if not self._stopped:
            self._text += self._detok.flush()
        return self._take(len(self._text))
