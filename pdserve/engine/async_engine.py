"""Asyncio front of the engine: the step loop runs in its own thread.

    asyncio (HTTP handlers) ──commands (SimpleQueue)──► engine thread: drain, step, step, ...
            ▲                                              │
            └──── per-request callbacks ◄─call_soon_threadsafe (one per step)── StepOutputs

The model's heavy kernels release the GIL, so HTTP parsing and SSE writes proceed while a step
computes; the engine thread never awaits anything, so a slow client cannot stall a step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pdserve.engine.engine import EngineStats, LLMEngine
from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.outputs import StepOutput
from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.request import RequestStatus
from pdserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Add:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    kv_transfer_params: object | None
    sink: Callable[[StepOutput], None]
    loop: asyncio.AbstractEventLoop
    lora: LoRARequest | None = None
    priority: int = 0
    pooling: PoolingParams | None = None
    cache_salt: str | None = None


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    """Run `fn` on the engine thread between steps; its result (or exception) resolves `done`."""

    fn: Callable[[], object]
    done: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._sinks: dict[str, tuple[Callable[[StepOutput], None], asyncio.AbstractEventLoop]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.stats: EngineStats = engine.stats()
        if engine.connector is not None:  # KV events (transfer done, blocks read) wake an idle loop
            engine.connector.events.wake = self._wake.set
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    # ---- asyncio side ------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        kv_transfer_params: object | None = None,
        lora: LoRARequest | None = None,
        priority: int = 0,
        pooling: PoolingParams | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Stream a request's outputs (with the loaded adapter `lora`); with `pooling`, an embedding
        request's one final output; `cache_salt` as LLMEngine.add_request's. Leaving the iteration
        early (client gone) aborts it."""
        sink: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.submit(request_id, token_ids, params, sink.put_nowait, kv_transfer_params, lora, priority, pooling,
                    cache_salt)
        finished = False
        try:
            while not finished:
                out = await sink.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def submit(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[StepOutput], None],
        kv_transfer_params: object | None = None,
        lora: LoRARequest | None = None,
        priority: int = 0,
        pooling: PoolingParams | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """Send a request (arguments as `generate`'s) without awaiting anything: `on_output(out)` is
        then called on the running event loop, in order, for each of its outputs, the last with
        `finished` set. The caller aborts it (`abort`) when it stops listening. Raises ValueError for
        an invalid request, RuntimeError once the engine is shutting down."""
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        kv_transfer_params = self.engine.validate_request(token_ids, params, kv_transfer_params, pooling)
        self.engine.validate_priority(priority)
        self._send(_Add(request_id, token_ids, params, kv_transfer_params, on_output, asyncio.get_running_loop(), lora,
                        priority, pooling, cache_salt))

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    async def call(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the engine thread between two steps (what touches engine state); its
        exception is raised here."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._send(_Call(fn, done, loop))
        return await done

    async def reset_prefix_cache(self) -> int:
        """Forget every free cached block (between benchmark runs); the number forgotten."""
        return await self.call(self.engine.block_pool.reset_cache)

    def _send(self, cmd: _Add | _Abort | _Call | None) -> None:
        self._inbox.put(cmd)
        self._wake.set()

    @property
    def num_in_flight(self) -> int:
        return len(self._sinks)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop thread (in-flight requests should have drained first)."""
        self._stopping = True
        self._send(None)
        self._thread.join(timeout)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; in-flight ones go on."""
        self._stopping = True

    # ---- engine thread -------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        """False once the step-loop thread has died (the server then reports unhealthy)."""
        return self._thread.is_alive()

    def _deliver(self, outs: list[StepOutput]) -> None:
        """Hand outputs to their callbacks: one thread-safe call per event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[StepOutput], None], StepOutput]]] = {}
        for out in outs:
            entry = self._sinks.get(out.request_id)
            if entry is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            sink, loop = entry
            by_loop.setdefault(loop, []).append((sink, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _drain_inbox(self) -> bool:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if cmd is None:
                return False
            if isinstance(cmd, _Abort):
                self.engine.abort_request(cmd.request_id)
                continue
            if isinstance(cmd, _Call):
                try:
                    result: object = cmd.fn()
                except Exception as e:  # the caller's error (a bad adapter, say), not the loop's
                    cmd.loop.call_soon_threadsafe(_fail, cmd.done, e)
                else:
                    cmd.loop.call_soon_threadsafe(_resolve, cmd.done, result)
                continue
            if cmd.request_id in self._sinks:
                err = StepOutput(cmd.request_id, [], "", True, "error", error="duplicate request id in flight")
                cmd.loop.call_soon_threadsafe(_put_all, [(cmd.sink, err)])
                continue
            self._sinks[cmd.request_id] = (cmd.sink, cmd.loop)
            try:
                self.engine.add_request(cmd.request_id, cmd.token_ids, cmd.params, cmd.kv_transfer_params, cmd.lora,
                                        cmd.priority, cmd.pooling, cmd.cache_salt)
            except Exception as e:  # validated already; anything here fails this request only
                self._deliver([StepOutput(cmd.request_id, [], "", True, "error", error=str(e))])

    def _fail_all(self, reason: str) -> None:
        for rid in list(self.engine.scheduler.requests):
            self.engine.scheduler.finish(rid, RequestStatus.FINISHED_ERROR, reason)
            self._deliver([StepOutput(rid, [], "", True, "error", error=reason)])

    def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking for work: a wake-up after this point is not lost
            if not self._drain_inbox():
                return
            try:
                if self.engine.has_unfinished():
                    outs = self.engine.step()
                else:
                    outs = self.engine.tick()  # KV connector housekeeping (frees, leases)
            except Exception as e:  # a failed step must not kill the server: fail its requests
                log.exception("engine step failed")
                self._fail_all(f"engine error: {e}")
                outs = []
            self._deliver(outs)
            self.stats = self.engine.stats()
            if self.engine.idle:
                # Nothing to compute (idle, or only requests waiting for remote KV): sleep until woken.
                self._wake.wait(0.005 if self.engine.has_unfinished() else 0.05)


def _resolve(done: asyncio.Future[Any], value: object) -> None:
    if not done.done():  # the caller may have gone
        done.set_result(value)


def _fail(done: asyncio.Future[Any], error: Exception) -> None:
    if not done.done():
        done.set_exception(error)


def _put_all(items: list[tuple[Callable[[StepOutput], None], StepOutput]]) -> None:
    for sink, out in items:
        try:
            sink(out)
        except Exception:  # one request's bug must not lose the other requests' outputs
            log.exception("output callback of request %s failed", out.request_id)
