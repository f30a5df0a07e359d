"""Per-request output text: incremental detokenization plus stop strings.

Text that might be the start of a stop string is held back until it is known not to be, so a
stream never shows a stop string (vLLM's default: stop strings are not included in the output).
With vLLM's `include_stop_str_in_output` the text ends with the stop string that ended it, and
nothing is held back (the stop string is shown anyway), as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.model.tokenizer import IncrementalDetokenizer, Tokenizer


class TextState:
    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str], skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False, spaces_between_special_tokens: bool = True,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens,
                                             spaces_between_special_tokens=spaces_between_special_tokens)
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        # A stop string may start this far before the newest text; that much is held back unless shown anyway.
        self._lookback = max((len(s) for s in self._stop), default=1) - 1
        self._hold = 0 if include_stop_str_in_output else self._lookback
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
        start = max(0, len(self._text) - self._lookback)
        self._text += self._detok.add([token_id])
        if self._stop:
            end = self._stop_end(start)
            if end is not None:
                self._text = self._text[:end]
                self._stopped = True
                return self._take(len(self._text)), True
        return self._take(len(self._text) - self._hold), False

    def _stop_end(self, start: int) -> int | None:
        """Where the text ends when a stop string occurs at or after `start` (the earliest one; with
        include_stop_str_in_output after it, else before it), or None."""
        hits = [(i, len(s)) for s in self._stop if (i := self._text.find(s, start)) >= 0]
        if not hits:
            return None
        i, n = min(hits)
        return i + n if self._include_stop else i

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
