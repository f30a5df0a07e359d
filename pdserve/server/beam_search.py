"""One prompt's beam search on the AsyncEngine (vLLM's `use_beam_search`), as a task.

Each step sends every live beam (the prompt plus its tokens so far) to the engine at once as its own
request for one token with the candidates' logprobs (engine ids `<id>-beam-<step>-<i>`); the prefix
cache holds the shared prefix, so each such request computes only its last partial block. The first
step also computes the prompt's logprobs when asked (echo with logprobs, `prompt_logprobs`) and
reports the prompt's cached tokens. `engine/beam_search.py` picks the beams; the result is one
`Collected` per beam, best first, shaped as a finished generation's so the endpoints answer as for `n`
choices. `abort()` aborts the step's requests in flight; the task ends once the engine has delivered
their final outputs (so every block is free and no id is still in use), then calls `on_done`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.beam_search import BeamSearch, BeamSearchParams, BeamSearchSequence
from pdserve.engine.logprobs import TokenLogprob
from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.outputs import StepOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.tokenizer import Tokenizer
from pdserve.server.generation import Collected
from pdserve.server.logprobs import top_k
from pdserve.server.metrics import RequestTimer, ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BeamInput:
    """One prompt's search as a request asked for it."""

    request_id: str
    token_ids: list[int]
    params: BeamSearchParams
    arrival: float
    logprobs: int | None = None  # alternatives shown per token; None: no logprobs shown
    prompt_logprobs: int | None = None  # the prompt's own (echo with logprobs, vLLM's prompt_logprobs)
    skip_special_tokens: bool = True
    seed: int | None = None  # of the one token each step samples
    lora: LoRARequest | None = None
    priority: int = 0
    cache_salt: str | None = None  # vLLM's: the beams' prefix-cache blocks shared only within this salt


class _Ended(Exception):
    """A search that stops without a result: every choice ends with `reason`."""

    def __init__(self, reason: str, error: str | None = None) -> None:
        super().__init__(error or reason)
        self.reason = reason
        self.error = error


@dataclass
class _Progress:
    """What the first step reports about the prompt."""

    prompt_logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0


class BeamSearchRun:
    """The search of `inp` on `engine`, started at once (a task); `results()` waits for its choices."""

    def __init__(
        self,
        engine: AsyncEngine,
        inp: BeamInput,
        tokenizer: Tokenizer,
        eos_token_ids: tuple[int, ...],
        metrics: ServerMetrics,
        on_done: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self.input = inp
        self._tok = tokenizer
        self._eos = eos_token_ids
        self._timer = RequestTimer(metrics, inp.arrival)
        self._on_done = on_done
        self._in_flight: set[str] = set()  # engine requests sent, final output not yet delivered
        self._aborted = False
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"beam-search-{inp.request_id}")

    def abort(self) -> None:
        """Stop the search (no-op once it has ended): no further step starts, the current one's
        requests are aborted in the engine."""
        self._aborted = True
        for rid in list(self._in_flight):
            self.engine.abort(rid)

    async def results(self) -> list[Collected]:
        """The `beam_width` choices, best first; a failed or aborted search's all end so ("error",
        "abort"). Cancelling the caller does not cancel the search (abort it)."""
        return await asyncio.shield(self.task)

    async def _run(self) -> list[Collected]:
        try:
            choices = await self._search()
        except _Ended as e:
            choices = self._ended(e.reason, e.error)
        except Exception as e:  # a step the engine refused, or the engine is gone
            log.warning("beam search %s failed: %s", self.input.request_id, e)
            choices = self._ended("error", str(e))
        finally:
            self._on_done(self.input.request_id)
        self._observe(choices)
        return choices

    async def _search(self) -> list[Collected]:
        inp = self.input
        k = inp.logprobs or 0
        first = inp.params.step_params(k, inp.prompt_logprobs, inp.seed)
        later = inp.params.step_params(k, None, inp.seed)
        search = BeamSearch(inp.token_ids, inp.params, self._eos)
        progress = _Progress()
        while not search.done:
            outs = await self._step(search, first if search.steps == 0 else later)
            if search.steps == 0:
                progress = _Progress(outs[0].prompt_logprobs, outs[0].num_cached_tokens)
            search.advance([o.logprobs[0] for o in outs if o.logprobs])
        return [self._choice(seq, progress) for seq in search.result()]

    async def _step(self, search: BeamSearch, params: SamplingParams) -> list[StepOutput]:
        """Every live beam's request at once; their final outputs, each with its logprobs (_Ended
        when aborted meanwhile or when one failed)."""
        rids = [f"{self.input.request_id}-beam-{search.steps}-{i}" for i in range(len(search.live))]
        outs = await asyncio.gather(
            *(self._one(rid, beam.tokens, params) for rid, beam in zip(rids, search.live, strict=True)),
            return_exceptions=True,  # every request ends before the step does
        )
        if self._aborted:
            raise _Ended("abort")
        done = [o for o in outs if isinstance(o, StepOutput) and o.logprobs]
        if len(done) < len(outs):
            failed = next(o for o in outs if not (isinstance(o, StepOutput) and o.logprobs))
            error = failed.error if isinstance(failed, StepOutput) else str(failed)
            raise _Ended("error", error or "a beam search step produced no token")
        return done

    async def _one(self, rid: str, token_ids: list[int], params: SamplingParams) -> StepOutput:
        """One beam's step: its final output, with every logprob it reported."""
        inp = self.input
        if self._aborted:  # checked with no await before the request is sent
            return StepOutput(rid, [], "", True, "abort")
        self._in_flight.add(rid)
        try:
            logprobs: list[TokenLogprob] = []
            prompt_logprobs = None
            last = StepOutput(rid, [], "", True, "error", error="the engine sent no output")
            async for out in self.engine.generate(
                rid, token_ids, params, None, inp.lora, inp.priority, cache_salt=inp.cache_salt
            ):
                logprobs += out.logprobs or []
                prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_logprobs
                last = out
            return dataclasses.replace(last, logprobs=logprobs or None, prompt_logprobs=prompt_logprobs)
        finally:
            self._in_flight.discard(rid)

    def _choice(self, seq: BeamSearchSequence, progress: _Progress) -> Collected:
        """A beam as a finished generation: its text without a final end-of-sequence token (its id
        only with include_stop_str_in_output), its logprobs with the alternatives asked for."""
        inp = self.input
        ids = seq.shown_token_ids(inp.params.include_stop_str_in_output)
        text = self._tok.decode(seq.shown_token_ids(False), inp.skip_special_tokens)
        lps = top_k(seq.logprobs[: len(ids)], inp.logprobs) if inp.logprobs is not None else []
        final = StepOutput(
            inp.request_id,
            ids,
            text,
            True,
            seq.finish_reason,
            num_prompt_tokens=len(inp.token_ids),
            num_output_tokens=len(ids),
            num_cached_tokens=progress.num_cached_tokens,
            logprobs=lps if inp.logprobs is not None else None,
            prompt_logprobs=progress.prompt_logprobs,
        )
        return Collected(text, final, lps, progress.prompt_logprobs, ids)

    def _ended(self, reason: str, error: str | None = None) -> list[Collected]:
        """Every choice of a search that ended without a result."""
        out = StepOutput(
            self.input.request_id, [], "", True, reason, num_prompt_tokens=len(self.input.token_ids), error=error
        )
        return [Collected("", out, [], None, []) for _ in range(self.input.params.beam_width)]

    def _observe(self, choices: list[Collected]) -> None:
        """The metrics count the search as one request: its tokens those of every choice."""
        best = choices[0].final
        ids = [t for c in choices for t in c.token_ids]
        self._timer.observe(dataclasses.replace(best, new_token_ids=ids))
