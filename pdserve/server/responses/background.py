"""Background responses (`background: true`): the create call answers at once — the Response with
status "queued", or (with `stream`) the stream of its events — and the generation goes on in a task
on the server's event loop, whatever the client does; "in_progress" from the engine's first output;
then "completed", "incomplete", "failed" or "cancelled".

`BackgroundRuns` holds the responses that are running; the store's LRU never forgets those (their
number is bounded by admission: each holds an engine request). When one ends it moves into the store
in the same step (cancelled or failed too: GET says why), so a lookup finds it in one or the other.
A cancel aborts its engine request (the engine frees its KV blocks and ends it with "abort": status
"cancelled"); a delete does too, and the response is not stored. A server that drains waits for the
running ones like any request in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from pdserve.server.responses.event_log import EventLog
from pdserve.server.responses.events import AnyEvent, frame
from pdserve.server.responses.items import ListedItem
from pdserve.server.responses.objects import FINAL
from pdserve.server.responses.output import OutputAssembler
from pdserve.server.responses.store import ResponseStore, StoredResponse

log = logging.getLogger(__name__)


class BackgroundRun:
    """One running background response."""

    def __init__(
        self,
        asm: OutputAssembler,
        input_items: Sequence[ListedItem],
        abort: Callable[[], None],
        events: EventLog | None,
    ) -> None:
        self.asm = asm  # its Response: "queued", "in_progress", then final
        self.input_items = input_items
        self._abort = abort  # its engine request's
        self.events = events
        self.deleted = False  # not stored when it ends
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.asm.response.id

    @property
    def entry(self) -> StoredResponse:
        """The response as GET shows it now (its output once it has ended)."""
        return StoredResponse(self.asm.response, self.input_items, self.events)

    def cancel(self) -> None:
        """Abort the engine request: the engine frees its blocks and ends it ("cancelled")."""
        self._abort()

    async def wait(self, timeout_s: float) -> None:
        """Until the run has ended (at most `timeout_s`)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout_s)


class BackgroundRuns:
    """The running background responses of one server, by id; each moves into `store` when it ends."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self._runs: dict[str, BackgroundRun] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, response_id: str) -> BackgroundRun | None:
        return self._runs.get(response_id)

    def find(self, response_id: str) -> StoredResponse | None:
        """The response as GET shows it: running, or stored (None: neither)."""
        run = self._runs.get(response_id)
        return run.entry if run is not None else self.store.get(response_id)

    def launch(self, run: BackgroundRun, events: AsyncIterator[AnyEvent]) -> None:
        """Run `events` (the response's, run.py) to their end in a task of their own."""
        self._runs[run.id] = run
        run.task = asyncio.get_running_loop().create_task(self._drive(run, events), name=f"background-{run.id}")

    def delete(self, response_id: str) -> bool:
        """Stop a running response and forget it; False when none runs under that id."""
        run = self._runs.pop(response_id, None)
        if run is None:
            return False
        run.deleted = True
        run.cancel()
        return True

    async def _drive(self, run: BackgroundRun, events: AsyncIterator[AnyEvent]) -> None:
        try:
            async for event in events:
                if run.events is not None:
                    run.events.append(frame(event))
        except Exception:  # a bug: the response fails rather than staying "in_progress"
            log.exception("background response %s failed", run.id)
        finally:
            run.cancel()  # no-op once the engine request has ended
            if run.asm.response.status not in FINAL:
                for event in run.asm.fail("the server stopped generating this response"):
                    if run.events is not None:
                        run.events.append(frame(event))
            if run.events is not None:
                run.events.close()
            self._runs.pop(run.id, None)
            if not run.deleted:
                self.store.put(run.entry)
            run.done.set()
