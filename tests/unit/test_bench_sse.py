"""SSE framing and interpretation of recorded /v1/completions and /v1/chat/completions byte streams."""

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


# --- chat completions ------------------------------------------------------------------------


def _chat(delta: dict[str, object], finish: str | None = None) -> str:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


# As pdserve's /v1/chat/completions streams it with --reasoning-parser: the role announcement (sent
# before the prompt is prefilled), two reasoning chunks, an empty-content chunk (the parser holding
# "</think>" back), content, the last token with finish_reason, the usage chunk, [DONE].
RECORDED_CHAT = (
    _chat({"role": "assistant", "content": ""})
    + _chat({"content": "", "reasoning_content": "Hm"})
    + _chat({"content": "", "reasoning_content": "m."})
    + _chat({"content": ""})
    + ": ping\n\n"
    + _chat({"content": "Sí"})
    + _chat({"content": "!"}, "length")
    + 'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    '"usage":{"prompt_tokens":12,"completion_tokens":6,"total_tokens":18}}\n\n' + "data: [DONE]\n\n"
).encode()

EXPECTED_CHAT: list[StreamItem] = [
    TokenChunk("", reasoning="Hm"),
    TokenChunk("", reasoning="m."),
    TokenChunk(""),
    TokenChunk("Sí"),
    TokenChunk("!", "length"),
    UsageChunk(prompt_tokens=12, completion_tokens=6),
    StreamDone(),
]


def _chat_items(pieces: list[bytes]) -> list[StreamItem]:
    dec = SSEDecoder()
    events = [ev for p in pieces for ev in dec.feed(p)] + dec.close()
    return [item for ev in events for item in interpret(ev, chat=True)]


def test_recorded_chat_stream_role_chunk_is_not_a_token() -> None:
    assert _chat_items([RECORDED_CHAT]) == EXPECTED_CHAT


@pytest.mark.parametrize("cut", range(1, len(RECORDED_CHAT), 23))
def test_recorded_chat_stream_any_split(cut: int) -> None:
    assert _chat_items([RECORDED_CHAT[:cut], RECORDED_CHAT[cut:]]) == EXPECTED_CHAT


def test_recorded_chat_stream_byte_by_byte() -> None:
    assert _chat_items([RECORDED_CHAT[i : i + 1] for i in range(len(RECORDED_CHAT))]) == EXPECTED_CHAT


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        ({"role": "assistant"}, []),  # announcement without content
        ({"role": "assistant", "content": None}, []),
        ({"role": "assistant", "content": "Hi"}, [TokenChunk("Hi")]),  # a server that sends the first token with it
        ({"reasoning": "so"}, [TokenChunk("", reasoning="so")]),  # vLLM's newer field name
        ({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, [TokenChunk("")]),
        ({"role": "assistant", "content": "", "tool_calls": [{"index": 0}]}, [TokenChunk("")]),
        ({}, [TokenChunk("")]),  # e.g. a finish-only chunk: a chunk like any other (vLLM's client too)
    ],
)
def test_chat_deltas(delta: dict[str, object], expected: list[StreamItem]) -> None:
    assert interpret(SSEEvent(data=_chat(delta)[6:-2]), chat=True) == expected


def test_chat_chunk_without_delta_and_errors() -> None:
    assert interpret(SSEEvent(data='{"choices": [{"index": 0, "text": "x"}]}'), chat=True) == []
    data = '{"object": "error", "message": "engine died", "code": 500}'
    assert interpret(SSEEvent(data=data), chat=True) == [StreamError("engine died (500)")]


def test_a_completions_chunk_read_as_chat_is_no_token_and_vice_versa() -> None:
    assert interpret(SSEEvent(data=_chunk("x")[6:-2]), chat=True) == []
    assert interpret(SSEEvent(data=_chat({"content": "x"})[6:-2])) == [TokenChunk("")]
