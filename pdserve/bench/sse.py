"""Server-sent events: bytes -> events -> typed items of an OpenAI completions or chat stream.

Pure functions and a tiny incremental decoder, so a recorded byte stream can be replayed in tests.

A completions chunk with a choice is a token chunk, its text possibly empty (a special token), as
vLLM's client counts it. A chat chunk's choice carries a `delta`: it is a token chunk unless it only
announces the role (`{"role": "assistant", "content": ""}`, which pdserve sends before the prompt is
prefilled, as OpenAI does: counting it would make TTFT the time to the announcement). Generated
text is `content`; `reasoning_content` (vLLM's older name, pdserve's) or `reasoning` (vLLM's newer)
and `tool_calls` are generated tokens too.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"


class SSEDecoder:
    """Incremental SSE framing (WHATWG rules, the subset servers use): feed bytes, get events."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._buf + self._utf8.decode(chunk)
        held = "\r" if text.endswith("\r") else ""  # may be the first half of a CRLF split across reads
        text = text.removesuffix("\r").replace("\r\n", "\n").replace("\r", "\n")
        *lines, rest = text.split("\n")
        self._buf = rest + held
        return [ev for line in lines if (ev := self._line(line)) is not None]

    def close(self) -> list[SSEEvent]:
        """End of stream: a last event without its blank line still counts (as vLLM's client does)."""
        tail = self._buf + self._utf8.decode(b"", final=True)
        self._buf = ""
        if tail.removesuffix("\r"):
            self._line(tail.removesuffix("\r"))
        ev = self._line("")
        return [ev] if ev is not None else []

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent(data="\n".join(self._data), event=self._event or "message")
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            return None  # comment / keep-alive ping
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


@dataclass(frozen=True)
class TokenChunk:
    """A chunk with a choice: one or more new tokens (or none, e.g. a special token's empty text)."""

    text: str
    finish_reason: str | None = None
    reasoning: str = ""  # chat: the delta's reasoning text (not part of the generated text)


@dataclass(frozen=True)
class UsageChunk:
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens (prefix cache)


@dataclass(frozen=True)
class StreamError:
    message: str


@dataclass(frozen=True)
class StreamDone:
    pass


StreamItem = TokenChunk | UsageChunk | StreamError | StreamDone


def interpret(ev: SSEEvent, chat: bool = False) -> list[StreamItem]:
    """What one SSE event of a /v1/completions stream (of /v1/chat/completions with `chat`) means."""
    if ev.data.strip() == "[DONE]":
        return [StreamDone()]
    try:
        obj = json.loads(ev.data)
    except json.JSONDecodeError:
        if ev.event == "error":
            return [StreamError(ev.data.strip() or "error event")]
        return [StreamError(f"invalid JSON in SSE data: {ev.data[:200]!r}")]
    if not isinstance(obj, dict):
        return [StreamError(f"unexpected SSE payload: {ev.data[:200]!r}")]
    if ev.event == "error" or "error" in obj or obj.get("object") == "error":
        return [StreamError(_error_message(obj))]
    items: list[StreamItem] = []
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        token = _chat_token(first) if chat else TokenChunk(str(first.get("text") or ""), first.get("finish_reason"))
        if token is not None:
            items.append(token)
    usage = obj.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
        items.append(UsageChunk(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), cached))
    return items


def _chat_token(choice: dict[str, object]) -> TokenChunk | None:
    """The token chunk of a chat choice, or None for a role announcement (or a delta-less choice)."""
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return None
    content = _str(delta.get("content"))
    reasoning = _str(delta.get("reasoning_content")) or _str(delta.get("reasoning"))
    if "role" in delta and not (content or reasoning or delta.get("tool_calls")):
        return None
    finish = choice.get("finish_reason")
    return TokenChunk(content, finish if isinstance(finish, str) else None, reasoning)


def _str(v: object) -> str:
    return v if isinstance(v, str) else ""


def _error_message(obj: dict[str, object]) -> str:
    err = obj.get("error", obj)
    if isinstance(err, dict):
        msg = err.get("message") or err.get("msg") or json.dumps(err)[:300]
        code = err.get("code") or err.get("type")
        return f"{msg} ({code})" if code else str(msg)
    return str(err)


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None
