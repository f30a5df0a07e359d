"""The events of a streamed background response (`background` and `stream` both true), kept so that
whoever follows them — the create call's own stream, or `GET /v1/responses/{id}?stream=true
&starting_after=n` (to pick a dropped stream back up, as OpenAI's cursor) — gets every event after
the one it names, then the new ones as they come, until the end. Frame i is the event whose
`sequence_number` is i. The log lives as long as its response: while it runs, then in the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class EventLog:
    """Framed events, appended by the response's run (on the event loop); any number of followers."""

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._closed = False
        self._grown = asyncio.Event()  # replaced at every change: a follower waits on the one it saw

    def __len__(self) -> int:
        return len(self._frames)

    def append(self, frame: bytes) -> None:
        self._frames.append(frame)
        self._wake()

    def close(self) -> None:
        """The response has ended: followers stop after the last frame."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        grown, self._grown = self._grown, asyncio.Event()
        grown.set()

    async def follow(self, starting_after: int | None = None) -> AsyncIterator[bytes]:
        """The frames after event `starting_after` (None: from the first), then each new one, until
        the log is closed."""
        i = 0 if starting_after is None else max(starting_after + 1, 0)
        while True:
            grown = self._grown
            while i < len(self._frames):
                yield self._frames[i]
                i += 1
            if self._closed:
                return
            await grown.wait()
