"""One engine request as seen by the HTTP side.

The engine hands each output to the `Generation` (`AsyncEngine.submit`'s callback), not to the
HTTP handler, so metrics are recorded and the request id released exactly once, when the engine
says the request has finished, whatever the client does. The handler reads the outputs (those that
piled up while it was busy merged into one, `merge_outputs`); if it goes away (client disconnect,
handler cancelled) it calls `abort()`, the engine frees the blocks and sends a final "abort"
output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.logprobs import TokenLogprob
from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.outputs import StepOutput
from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.messages import KVTransferParams
from pdserve.server.metrics import RequestTimer, ServerMetrics
from pdserve.server.vllm_metrics import ChoiceGroup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collected:
    """A whole non-streamed result."""

    text: str
    final: StepOutput
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None
    token_ids: list[int] = field(default_factory=list)  # the generated ones


@dataclass(frozen=True)
class GenerationInput:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    kv_transfer_params: KVTransferParams | None
    arrival: float
    lora: LoRARequest | None = None  # the adapter the request's `model` named
    priority: int = 0  # lower first, under --scheduling-policy priority
    pooling: PoolingParams | None = None  # an embedding request (server/embeddings.py)
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only with the same salt
    choices: ChoiceGroup | None = None  # the request's n > 1 engine requests (vLLM's per-request metrics)


class Generation:
    """Created by `ServerContext.start` right after admission (no await in between);
    `on_done(request_id)` runs once the engine has delivered the final output.

    With `after`, the engine request is sent only once `after` is set (the `first_output` of
    another generation of the same prompt: that prompt's KV is then in the prefix cache, so this
    one computes only its last block). Aborted before it is sent (before `after`, or before its task
    first runs), it never reaches the engine."""

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        inp: GenerationInput,
        on_done: Callable[[str], None],
        after: asyncio.Event | None = None,
    ) -> None:
        self.engine = engine
        self.input = inp
        self.request_id = inp.request_id
        self._on_done = on_done
        self._timer = RequestTimer(metrics, inp.arrival, None if inp.pooling else inp.params, inp.choices)
        self._loop = asyncio.get_running_loop()
        self._unread: list[StepOutput] = []  # delivered, not yet taken by `outputs()`
        self._reader: asyncio.Future[None] | None = None  # `outputs()` waiting for more
        self._after = after
        self._aborted = asyncio.Event()  # abort() before the engine request was sent
        # The engine request was sent (set by the task, with no await before it is): an abort() before
        # then, even before the task first runs, is kept in `_aborted` and the request never starts.
        self._sent = False
        self.first_output = asyncio.Event()  # set at the first output (or the end, whatever it was)
        self.finished = False
        self.task = self._loop.create_task(self._start(), name=f"generation-{inp.request_id}")

    async def _start(self) -> None:
        """Send the engine request when its turn comes; its outputs then arrive at `_put`."""
        inp = self.input
        try:
            if not await self._wait_turn():
                self._put(StepOutput(inp.request_id, [], "", True, "abort", num_prompt_tokens=len(inp.token_ids)))
                return
            self.engine.submit(inp.request_id, inp.token_ids, inp.params, self._put, inp.kv_transfer_params, inp.lora,
                               inp.priority, inp.pooling, inp.cache_salt)
        except asyncio.CancelledError:  # the loop is shutting down before the request was sent
            if not self._sent:
                self._put(StepOutput(inp.request_id, [], "", True, "abort", num_prompt_tokens=len(inp.token_ids)))
            raise
        except Exception as e:  # validation raced with a drain, or the engine is gone
            log.warning("request %s failed to start: %s", inp.request_id, e)
            self._put(
                StepOutput(inp.request_id, [], "", True, "error", num_prompt_tokens=len(inp.token_ids), error=str(e))
            )

    async def _wait_turn(self) -> bool:
        """Wait for `after` (False: aborted meanwhile)."""
        if self._after is not None:
            turn = asyncio.ensure_future(self._after.wait())
            gone = asyncio.ensure_future(self._aborted.wait())
            try:
                await asyncio.wait((turn, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                turn.cancel()
                gone.cancel()
        if self._aborted.is_set():
            return False
        self._sent = True
        return True

    def _put(self, out: StepOutput) -> None:
        """An output of this request (on the loop's thread; the engine's come in order)."""
        if self.finished:  # the end is already settled (an abort before the request was sent)
            return
        self._timer.observe(out)
        self._unread.append(out)
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)
        self.first_output.set()
        if out.finished:
            self.finished = True
            self._on_done(self.request_id)

    def abort(self) -> None:
        """Ask the engine to stop this request (no-op once it has finished)."""
        if self.finished:
            return
        if self._sent:
            self.engine.abort(self.request_id)
        else:
            self._aborted.set()

    async def outputs(self) -> AsyncIterator[StepOutput]:
        """The engine's outputs, ending with the one that has `finished` set (one reader at a time).
        Those that arrived since the reader last looked come merged (`merge_outputs`): a reader that
        fell behind (a slow client, a busy loop) catches up in one go instead of a write per token."""
        while True:
            if not self._unread:
                self._reader = self._loop.create_future()
                try:
                    await self._reader
                finally:
                    self._reader = None
            outs, self._unread = self._unread, []
            for out in merge_outputs(outs) if len(outs) > 1 else outs:
                yield out
                if out.finished:
                    return

    async def collect(self) -> Collected:
        """Wait for the end: the whole text, the final output, every token's logprobs (if asked)."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        prompt_logprobs = None
        token_ids: list[int] = []
        async for out in self.outputs():
            parts.append(out.new_text)
            token_ids.extend(out.new_token_ids)
            logprobs.extend(out.logprobs or ())
            prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_logprobs
            if out.finished:
                return Collected("".join(parts), out, logprobs, prompt_logprobs, token_ids)
        raise AssertionError("unreachable")


def merge_outputs(outs: list[StepOutput]) -> list[StepOutput]:
    """Consecutive outputs of one request as one, as if one engine step had made all their tokens
    (as a speculative step does): text, token ids and logprobs joined in order, the prompt's
    logprobs from the first that has them, the rest (finished, counts, kv_transfer_params) from
    the last. An error output stays on its own, after the tokens that came before it."""
    merged: list[StepOutput] = []
    run: list[StepOutput] = []
    for out in outs:
        if out.finish_reason == "error" or out.error is not None:
            if run:
                merged.append(_joined(run))
                run = []
            merged.append(out)
        else:
            run.append(out)
    if run:
        merged.append(_joined(run))
    return merged


def _joined(run: list[StepOutput]) -> StepOutput:
    if len(run) == 1:
        return run[0]
    last = run[-1]
    has_logprobs = any(o.logprobs is not None for o in run)
    return dataclasses.replace(
        last,
        new_token_ids=[t for o in run for t in o.new_token_ids],
        new_text="".join(o.new_text for o in run),
        logprobs=[lp for o in run for lp in o.logprobs or ()] if has_logprobs else None,
        prompt_logprobs=next((o.prompt_logprobs for o in run if o.prompt_logprobs is not None), None),
    )


async def watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Call `on_disconnect` when the client goes away. Run as a task once the body has been read
    (the ASGI receive channel then only carries `http.disconnect`); cancel it when done."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return
