"""SSE framing and interpretation of a recorded /v1/completions byte stream."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.sse import (
    SSEDecoder,
    SSEEvent,
    StreamDone,
    StreamError,
    StreamItem,
    TokenChunk,
    UsageChunk,
    interpret,
)


def _chunk(text: str, finish: str | None = None) -> str:
    body = {"id": "cmpl-1", "object": "text_completion", "model": "m"}
    body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]  # type: ignore[assignment]
    return f"data: {json.dumps(body)}\n\n"


# As a vLLM-style server sends it: one token, a two-token chunk (speculative decoding / batching),
# an empty-text chunk (special token), a keep-alive comment, a last token with finish_reason,
# the usage chunk (choices == []), and [DONE]. Non-ASCII text checks UTF-8 reassembly.
RECORDED = (
    _chunk("Hé")
    + _chunk("llo wörld")
    + ": ping\n\n"
    + _chunk("")
    + _chunk("!", "length")
    + 'data: {"id":"cmpl-1","object":"text_completion","choices":[],'
    '"usage":{"prompt_tokens":8,"completion_tokens":5,"total_tokens":13}}\n\n' + "data: [DONE]\n\n"
).encode()

EXPECTED: list[StreamItem] = [
    TokenChunk("Hé"),
    TokenChunk("llo wörld"),
    TokenChunk(""),
    TokenChunk("!", "length"),
    UsageChunk(prompt_tokens=8, completion_tokens=5),
    StreamDone(),
]


def _items(pieces: list[bytes]) -> list[StreamItem]:
    dec = SSEDecoder()
    events = [ev for p in pieces for ev in dec.feed(p)] + dec.close()
    return [item for ev in events for item in interpret(ev)]


def test_recorded_stream_whole() -> None:
    assert _items([RECORDED]) == EXPECTED


def test_recorded_stream_byte_by_byte() -> None:
    assert _items([RECORDED[i : i + 1] for i in range(len(RECORDED))]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, 200, 7))
def test_recorded_stream_any_split(cut: int) -> None:
    assert _items([RECORDED[:cut], RECORDED[cut:]]) == EXPECTED


def test_crlf_line_endings_split_inside_crlf() -> None:
    raw = RECORDED.replace(b"\n", b"\r\n")
    cut = raw.index(b"\r\n") + 1  # between \r and \n
    assert _items([raw[:cut], raw[cut:]]) == EXPECTED


def test_events_become_available_only_when_complete() -> None:
    dec = SSEDecoder()
    first = _chunk("a").encode()
    assert dec.feed(first[:-1]) == []  # blank line not yet seen
    assert dec.feed(first[-1:]) == [SSEEvent(data=first.decode()[6:-2])]


def test_last_event_without_blank_line_is_flushed_on_close() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: [DONE]") == []
    assert [interpret(ev) for ev in dec.close()] == [[StreamDone()]]


def test_multiline_data_and_event_name() -> None:
    dec = SSEDecoder()
    events = dec.feed(b'event: error\ndata: {"error":\ndata: {"message": "boom", "code": 500}}\n\n')
    assert events == [SSEEvent(data='{"error":\n{"message": "boom", "code": 500}}', event="error")]
    assert interpret(events[0]) == [StreamError("boom (500)")]


@pytest.mark.parametrize(
    ("data", "event", "expected"),
    [
        (
            '{"error": {"message": "out of KV blocks", "type": "BadRequestError"}}',
            "message",
            "out of KV blocks (BadRequestError)",
        ),
        ('{"object": "error", "message": "engine died", "code": 500}', "message", "engine died (500)"),
        ("upstream went away", "error", "upstream went away"),
    ],
)
def test_error_events(data: str, event: str, expected: str) -> None:
    assert interpret(SSEEvent(data=data, event=event)) == [StreamError(expected)]


def test_invalid_json_is_an_error_item() -> None:
    [item] = interpret(SSEEvent(data="{not json"))
    assert isinstance(item, StreamError) and "invalid JSON" in item.message


def test_chunk_with_choice_and_usage_yields_both() -> None:
    data = '{"choices":[{"text":"x","finish_reason":null}],"usage":{"prompt_tokens":3,"completion_tokens":1}}'
    assert interpret(SSEEvent(data=data)) == [TokenChunk("x"), UsageChunk(3, 1)]


def test_usage_with_cached_prompt_tokens() -> None:
    data = ('{"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":2,'
            '"prompt_tokens_details":{"cached_tokens":32}}}')
    assert interpret(SSEEvent(data=data)) == [UsageChunk(40, 2, 32)]
    bad = '{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"prompt_tokens_details":"x"}}'
    assert interpret(SSEEvent(data=bad)) == [UsageChunk(4, 2, None)]


def test_usage_without_counts() -> None:
    assert interpret(SSEEvent(data='{"choices": [], "usage": {}}')) == [UsageChunk(None, None)]
