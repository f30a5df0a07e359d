"""`sse.TextSlot`: a plain chunk from its template is byte for byte the chunk pydantic writes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdserve.server import sse
from pdserve.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionChunk,
    DeltaMessage,
)

TRICKY = ["", "a", '"', "\\", "\n\r\t\b\f", "\x00\x01\x1f\x7f", "é wörld", "\u2028\u2029", "日本語", "😀", "</script>",
          "data: [DONE]\n\n", "\ud7ff\ue000\uffff"]


def completion_event(text: str) -> bytes:
    choice = CompletionChoice(index=2, text=text, logprobs=None, finish_reason=None)
    return sse.event(CompletionChunk(id="cmpl-x", created=1, model="m", choices=[choice]))


def chat_event(text: str) -> bytes:
    choice = ChatChunkChoice(index=0, delta=DeltaMessage(content=text), logprobs=None, finish_reason=None)
    return sse.event(ChatCompletionChunk(id="chatcmpl-x", created=1, model="m", choices=[choice]))


@pytest.mark.parametrize("make", [completion_event, chat_event])
def test_slot_matches_pydantic_on_tricky_text(make: Callable[[str], bytes]) -> None:
    slot = sse.TextSlot(make)
    for text in TRICKY:
        assert slot(text) == make(text)


@given(st.text())
def test_slot_matches_pydantic(text: str) -> None:
    assert sse.TextSlot(completion_event)(text) == completion_event(text)


def test_every_code_point_is_written_alike() -> None:
    slot = sse.TextSlot(completion_event)
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert slot(text) == completion_event(text)


def test_marker_found_twice_falls_back_to_the_model() -> None:
    """A template needs the text in one place; otherwise every event is built in full."""

    def twice(text: str) -> bytes:
        return sse.event(CompletionChunk(id=text, created=1, model="m",
                                         choices=[CompletionChoice(index=0, text=text, logprobs=None)]))

    slot = sse.TextSlot(twice)
    for text in TRICKY:
        assert slot(text) == twice(text)
