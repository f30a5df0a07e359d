"""One engine request as seen by the HTTP side: a task that drains the engine's stream.

The task, not the HTTP handler, iterates `AsyncEngine.generate`, so metrics are recorded and the
request id released exactly once, when the engine says the request has finished, whatever the
client does. The handler reads the outputs from a queue; if it goes away (client disconnect,
handler cancelled) it calls `abort()`, the engine frees the blocks and sends a final "abort"
output, and the task ends.
"""

from __future__ import annotations

import asyncio
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
        self._timer = RequestTimer(metrics, inp.arrival)
        self._outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._after = after
        self._aborted = asyncio.Event()  # abort() before the engine request was sent
        # The engine request was sent (set by the task, with no await before it is): an abort() before
        # then, even before the task first runs, is kept in `_aborted` and the request never starts.
        self._sent = False
        self.first_output = asyncio.Event()  # set at the first output (or the end, whatever it was)
        self.finished = False
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"generation-{inp.request_id}")

    async def _run(self) -> None:
        inp = self.input
        try:
            if not await self._wait_turn():
                self._put(StepOutput(inp.request_id, [], "", True, "abort", num_prompt_tokens=len(inp.token_ids)))
                return
            async for out in self.engine.generate(
                inp.request_id, inp.token_ids, inp.params, inp.kv_transfer_params, inp.lora, inp.priority, inp.pooling,
                inp.cache_salt,
            ):
                self._put(out)
        except Exception as e:  # validation raced with a drain, or the engine is gone
            log.warning("request %s failed to start: %s", inp.request_id, e)
            self._put(
                StepOutput(inp.request_id, [], "", True, "error", num_prompt_tokens=len(inp.token_ids), error=str(e))
            )
        finally:
            self.finished = True
            self.first_output.set()
            self._on_done(inp.request_id)

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
        self._timer.observe(out)
        self._outputs.put_nowait(out)
        self.first_output.set()

    def abort(self) -> None:
        """Ask the engine to stop this request (no-op once it has finished)."""
        if self.finished:
            return
        if self._sent:
            self.engine.abort(self.request_id)
        else:
            self._aborted.set()

    async def outputs(self) -> AsyncIterator[StepOutput]:
        """The engine's outputs, ending with the one that has `finished` set."""
        while True:
            out = await self._outputs.get()
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


async def watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Call `on_disconnect` when the client goes away. Run as a task once the body has been read
    (the ASGI receive channel then only carries `http.disconnect`); cancel it when done."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return
