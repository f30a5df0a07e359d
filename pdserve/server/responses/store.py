"""Stored responses (`store` true or left out), for `GET /v1/responses/{id}`, its `input_items`,
`DELETE` and `previous_response_id`.

In memory, in the server process, bounded: the `capacity` most recently stored or used responses
(`pdserve serve --max-stored-responses`, default `DEFAULT_MAX_STORED_RESPONSES` in config.py); the
least recently used one is forgotten first, after which its id is a 404 (GET) or a 400
(`previous_response_id`). A background response is kept here once it has ended (background.py holds
it while it runs). Nothing survives a restart. A stored response keeps its whole conversation (the
items of every earlier turn, shared with the response it continued, not copied), which is at most one
context's worth of text (its prompt and output fit the model's context): memory is bounded by
capacity x max_model_len tokens of text (256 x 32k tokens: a few hundred MB at worst); a streamed
background response also keeps its events (a few times its output).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.server.responses.conversation import as_input
from pdserve.server.responses.event_log import EventLog
from pdserve.server.responses.items import ListedItem
from pdserve.server.responses.objects import ResponseObject
from pdserve.server.responses.request import InputItem


@dataclass(frozen=True)
class StoredResponse:
    response: ResponseObject
    input_items: Sequence[ListedItem]  # every earlier turn's items, then its own input; instructions left out
    events: EventLog | None = None  # a streamed background response's events (GET ?stream=true)

    @property
    def conversation(self) -> list[InputItem]:
        """Every turn's items, its output last: where a continuation's conversation starts."""
        return as_input([*self.input_items, *self.response.output])


class ResponseStore:
    """An LRU map from response id to `StoredResponse`; used from the event loop only."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("the response store's capacity must be 0 or more")
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response (now the most recently used), or None."""
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, entry: StoredResponse) -> None:
        """Store `entry` under its response's id, forgetting the least recently used beyond capacity."""
        if self.capacity == 0:
            return
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        """Forget the response; False when it was not stored."""
        return self._entries.pop(response_id, None) is not None
