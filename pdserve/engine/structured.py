"""Structured outputs: the tokens a constrained request may sample next, from a grammar (llguidance).

    request with StructuredOutputs ──compile (cached)──► grammar ──► LLMatcher (one per request)
    each step: matcher ──fill──► bitmask row [ceil(vocab / 32) x int32] ──► logits of disallowed ids = -inf
    after sampling: matcher.consume_token(id); a matcher that has stopped ends the request ("stop")

Masks are filled on the host before the forward pass (they depend only on the tokens accepted so
far) and copied to the device with the step's other inputs. JSON is compact (no free whitespace
between tokens): a model with flexible whitespace can otherwise pad forever.

Speculative decoding: a constrained request's drafts are cut at the first the grammar rejects and
after the first that completes it (`valid_drafts`), and its speculative row gets one mask row per
position, row j filled with the matcher advanced by drafts 1..j and rolled back after (`bitmask`);
the matcher itself only ever advances by emitted tokens (`accept`), so it stays where plain
decoding would have it.
"""

from __future__ import annotations

import functools
import importlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from pdserve.engine.sampling_params import StructuredOutputs
from pdserve.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import llguidance as llg


def _llg() -> ModuleType:
    """llguidance, imported on the first constrained request (an engine without any needs none)."""
    return importlib.import_module("llguidance")

_COMPACT_JSON = {"whitespace_flexible": False}
GRAMMAR_CACHE_ENTRIES = 128  # compiled grammars kept for repeated requests ...
GRAMMAR_CACHE_MAX_CHARS = 64 * 1024  # ... when small: a client's huge schemas must not pin memory


def grammar_of(so: StructuredOutputs) -> str:
    """The llguidance grammar of `so`; ValueError when its spec is not valid JSON / a grammar."""
    llg = _llg()
    if so.json is not None or so.json_object:
        try:
            schema = json.loads(so.json) if so.json is not None else {"type": "object"}
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid structured output: the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("invalid structured output: the JSON schema must be a JSON object")
        schema = {**schema, "x-guidance": {**_COMPACT_JSON, **schema.get("x-guidance", {})}}
        return llg.grammar_from("json_schema", json.dumps(schema))
    if so.regex is not None:
        return llg.grammar_from("regex", so.regex)
    if so.choice is not None:
        return llg.grammar_from("lark", "start: " + " | ".join(json.dumps(c) for c in so.choice))
    assert so.grammar is not None
    text = so.grammar
    if "::=" in text:  # GBNF (llama.cpp's), as vLLM also accepts
        try:
            text = importlib.import_module("llguidance.gbnf_to_lark").gbnf_to_lark(text)
        except Exception as e:  # the converter's own errors, whatever their type
            raise ValueError(f"invalid structured output: the GBNF grammar does not convert: {e}") from None
    return llg.grammar_from("lark", text)


class StructuredOutputManager:
    """One engine's constrained requests: compiles and validates grammars (ValueError with the
    compiler's message), keeps a matcher per request, fills bitmasks, accepts sampled tokens."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._matchers: dict[str, llg.LLMatcher] = {}
        self._executor: llg.LLExecutor | None = None
        self._grammars: OrderedDict[StructuredOutputs, str] = OrderedDict()
        self._lock = threading.Lock()

    @functools.cached_property
    def _lltok(self) -> llg.LLTokenizer:  # ~ms for a byte tokenizer, ~1 s for a 150k BPE: on first use
        return _llg().LLTokenizer(self._tokenizer.hf.to_str(), n_vocab=self.vocab_size,
                               eos_token=self._eos or None, slices=None)

    def _grammar(self, so: StructuredOutputs) -> str:
        """The validated grammar of `so`; small ones are kept (LRU) for the next request with them."""
        with self._lock:  # the HTTP thread validates, the engine thread adds
            grammar = self._grammars.get(so)
            if grammar is not None:
                self._grammars.move_to_end(so)
                return grammar
        grammar = grammar_of(so)
        error = _llg().LLMatcher.validate_grammar(grammar, self._lltok)
        if error:
            raise ValueError(f"invalid structured output: {error}")
        if len(grammar) <= GRAMMAR_CACHE_MAX_CHARS:
            with self._lock:
                self._grammars[so] = grammar
                while len(self._grammars) > GRAMMAR_CACHE_ENTRIES:
                    self._grammars.popitem(last=False)
        return grammar

    def validate(self, so: StructuredOutputs) -> None:
        self._grammar(so)

    def add(self, request_id: str, so: StructuredOutputs) -> None:
        matcher = _llg().LLMatcher(self._lltok, self._grammar(so))
        if matcher.is_error():
            raise ValueError(f"invalid structured output: {matcher.get_error()}")
        self._matchers[request_id] = matcher

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    @property
    def active(self) -> bool:
        """Some request in flight is constrained."""
        return bool(self._matchers)

    def valid_drafts(self, request_id: str, drafts: list[int]) -> list[int]:
        """The leading `drafts` that the request's grammar accepts in order, up to and including the
        first that completes it (output stops there: later drafts could never be emitted); all of
        them for an unconstrained request. Leaves the matcher as it was."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return drafts
        valid = matcher.validate_tokens(drafts)
        kept = 0
        while kept < valid:
            matcher.consume_token(drafts[kept])
            kept += 1
            if matcher.is_stopped():
                break
        matcher.rollback(kept)
        return drafts[:kept]

    def bitmask(self, rows: Sequence[str | None], device: torch.device,
                drafts: Mapping[str, Sequence[int]] | None = None) -> torch.Tensor | None:
        """[len(rows), ceil(vocab / 32)] int32 on `device`: row i allows what the matcher of
        request `rows[i]` allows (every id where rows[i] is None or unconstrained). A request with
        `drafts` (a speculative row, drafts from `valid_drafts`) fills 1 + len(drafts[id])
        consecutive rows from its entry, one per position: the j-th allows what its matcher allows
        after drafts[id][:j] (the entries of its later positions are skipped). None when no row is
        constrained."""
        plain, speculative = self._targets(rows, drafts or {})
        if not plain and not speculative:
            return None
        llg_np = importlib.import_module("llguidance.numpy")
        mask = llg_np.allocate_token_bitmask(len(rows), self.vocab_size)  # all ones
        if self._executor is None:
            self._executor = _llg().LLExecutor()
        if plain:
            llg_np.fill_next_token_bitmask_par(self._executor, plain, mask)
        if speculative:
            # Per matcher: fill, consume a draft, fill the next row, ..., then roll every draft back.
            # A position past a draft the grammar rejects would stay all ones: drafts are valid_drafts'.
            llg_np.fill_next_token_bitmask_par_with_draft_tokens(self._executor, speculative, mask)
        out = torch.from_numpy(mask)
        return out.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else out

    def _targets(self, rows: Sequence[str | None], drafts: Mapping[str, Sequence[int]]) -> tuple[
            list[tuple[llg.LLMatcher, int]], list[tuple[llg.LLMatcher, int, list[int]]]]:
        """The constrained entries of `rows` (see `bitmask`): (matcher, row) of those without
        drafts, (matcher, first row, drafts) of speculative ones."""
        plain: list[tuple[llg.LLMatcher, int]] = []
        speculative: list[tuple[llg.LLMatcher, int, list[int]]] = []
        i = 0
        while i < len(rows):
            rid = rows[i]
            row_drafts = list(drafts.get(rid, ())) if rid is not None else []
            matcher = self._matchers.get(rid) if rid is not None else None
            if matcher is not None and row_drafts:
                speculative.append((matcher, i, row_drafts))
            elif matcher is not None:
                plain.append((matcher, i))
            i += 1 + len(row_drafts)
        return plain, speculative

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's matcher by `token`. True when the output is complete (the matcher
        stopped) or the token was not allowed: the request should end."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        return not matcher.consume_token(token) or matcher.is_stopped()


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of ids whose bit is 0 to -inf, in place ([rows, vocab or more])."""
    rows, words = bitmask.shape
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(rows, words * 32).bool()
    vocab = min(logits.shape[1], words * 32)
    logits[:, :vocab].masked_fill_(~allowed[:, :vocab], float("-inf"))
    logits[:, vocab:] = float("-inf")
    return logits

