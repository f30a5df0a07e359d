"""Server-sent events: framing, the error event, and a response that aborts its generation.

A stream is `data: {json}\\n\\n` events ending with `data: [DONE]\\n\\n`. An engine-side failure
after the stream has started (the status line is already 200) is reported in band as
`data: {"error": {...}}` followed by `[DONE]`, as vLLM does.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.server.protocol import ErrorInfo, ErrorResponse

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: BaseModel) -> bytes:
    return b"data: " + payload.model_dump_json().encode() + b"\n\n"


class TextSlot:
    """The events of a stream that differ in one string field only (a plain chunk's text): the
    JSON around it encoded once. `make(s)` builds the event with `s` in that field; `slot(text)`
    gives the same bytes as `make(text)`, without building and dumping the model per token.
    (msgspec and pydantic write a JSON string alike, byte for byte: tests/unit/test_sse_slot.py.)"""

    def __init__(self, make: Callable[[str], bytes]) -> None:
        self._make = make
        parts = make(_MARKER).split(msgspec.json.encode(_MARKER))
        self._parts = (parts[0], parts[1]) if len(parts) == 2 else None

    def __call__(self, text: str) -> bytes:
        if self._parts is None:  # the marker showed up elsewhere too (a client-chosen id, say)
            return self._make(text)
        head, tail = self._parts
        return head + _json_string(text) + tail


_json_string = msgspec.json.encode
_MARKER = f"pdserve-slot-{uuid.uuid4().hex}"  # cannot occur in an id or a model name by chance


def error_event(message: str, code: str = "engine_error") -> bytes:
    return event(ErrorResponse(error=ErrorInfo(message=message, type="server_error", code=code)))


class GenerationStream(StreamingResponse):
    """An SSE response that calls `on_close` however it ends (finished, client gone, cancelled),
    so the engine request is aborted even if the body iterator never started."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers={**HEADERS, **headers})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
