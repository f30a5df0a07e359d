"""vLLM's `bad_words`: words a request's output must never continue into, tokenized once per request.

Each word is tokenized without special tokens twice, as vLLM does: as written (leading whitespace
stripped), and with one leading space (to catch it in the middle of a text, where BPE vocabularies
such as GPT-2's have a token for " word"), that second form kept only when it has as many tokens as
the first and starts with another token. A one-token word is never sampled; a longer one bans its
last token at every step where the output so far ends with its other tokens. Only the output
counts, as in vLLM: the prompt's tail does not start a word. So a word can still appear in the text
spelled with other tokens than those two forms (e.g. split across a different boundary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.model.tokenizer import Tokenizer


def word_token_ids(words: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    """The token sequences `words` ban (vLLM's two forms of each word, see the module doc); a word
    that tokenizes to nothing bans nothing."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip())
        spaced = tokenizer.encode(" " + word.lstrip())
        if plain:
            out.append(plain)
        if spaced and (not plain or (len(spaced) == len(plain) and spaced[0] != plain[0])):
            out.append(spaced)
    return out


@dataclass(frozen=True)
class BadWords:
    """A request's compiled `bad_words`: what each step may not sample, from the output's last tokens
    (no tokenization per step; a dict lookup per distinct word length)."""

    always: frozenset[int] = frozenset()  # one-token words
    # prefix length -> the word's tokens but its last -> the last tokens banned after that prefix
    after: dict[int, dict[tuple[int, ...], frozenset[int]]] = field(default_factory=dict)

    @classmethod
    def compile(cls, words: Sequence[str], tokenizer: Tokenizer, vocab_size: int) -> BadWords:
        """ValueError (naming `bad_words`) when a word's tokens lie outside the model's vocabulary."""
        sequences = word_token_ids(words, tokenizer)
        bad = sorted({t for seq in sequences for t in seq if not 0 <= t < vocab_size})
        if bad:
            raise ValueError(f"bad_words tokenize to token ids {bad}, out of range for vocabulary size {vocab_size}")
        always = frozenset(seq[0] for seq in sequences if len(seq) == 1)
        grouped: dict[int, dict[tuple[int, ...], set[int]]] = {}
        for seq in sequences:
            if len(seq) > 1:
                grouped.setdefault(len(seq) - 1, {}).setdefault(tuple(seq[:-1]), set()).add(seq[-1])
        after = {n: {prefix: frozenset(last) for prefix, last in by_prefix.items()} for n, by_prefix in grouped.items()}
        return cls(always, after)

    def banned(self, output: Sequence[int], preceding: Sequence[int] = ()) -> set[int]:
        """The token ids the next position may not take, after `output` and then `preceding` (a
        speculative row's earlier drafts)."""
        out = set(self.always)
        total = len(output) + len(preceding)
        for n, by_prefix in self.after.items():
            if n <= total:
                last = by_prefix.get(_tail(output, preceding, n))
                if last is not None:
                    out |= last
        return out


def _tail(output: Sequence[int], preceding: Sequence[int], n: int) -> tuple[int, ...]:
    """The last `n` tokens of `output` followed by `preceding` (n <= their total length)."""
    if n <= len(preceding):
        return tuple(preceding[len(preceding) - n :])
    k = n - len(preceding)
    return tuple(output[len(output) - k :]) + tuple(preceding)
