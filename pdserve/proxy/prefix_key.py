"""A request's prompt as the proxy sees it (no tokenizer): the leading bytes of its text, cut into
chunks and hashed as a chain, so that equal leading chunks mean equal prompt prefixes.

The chain starts from the request's `model` (a LoRA adapter's KV is cached apart from the base
model's) and its vLLM `cache_salt` (an instance shares cached KV only within one salt, so each salt
keeps its own affinity). Completions: the prompt string (or token ids, or the first of a list).
Chat: each message's role and text, in order — a shared system prompt and earlier turns are the
shared prefix. Responses: the instructions, then each input item's role (or type) and text, likewise.
What renders around the messages joins the chain's start: a request's own `chat_template`, its
`chat_template_kwargs` and its `tools` (templates put tool definitions in the first, system turn), so
requests that render one conversation differently do not share a key.

vLLM's `truncate_prompt_tokens` does not change the key: with no tokenizer the proxy cannot tell
where a cut prompt starts. A prompt within k tokens (a guard that did not cut) is computed as keyed;
a cut one is keyed by a start its instance never computed, which only misplaces affinity (the
instance's own prefix cache decides what is reused, so outputs are the same wherever it goes).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

CHUNK_BYTES = 64  # about one 16-token KV block of English text with a BPE tokenizer
MAX_KEY_BYTES = 32 * 1024  # a longer shared prefix does not change where the request goes


def prompt_key(body: dict[str, Any], path: str) -> tuple[bytes, ...]:
    """Chained 8-byte hashes of the prompt's whole chunks (empty when the body has no usable prompt)."""
    data = _prompt_bytes(body, path)[:MAX_KEY_BYTES]
    out: list[bytes] = []
    prev = _chain_start(body)
    if path.endswith(("/chat/completions", "/responses")):  # rendered by a chat template
        prev = _rendering(body, prev)
    for i in range(0, len(data) - CHUNK_BYTES + 1, CHUNK_BYTES):
        prev = hashlib.blake2b(prev + data[i : i + CHUNK_BYTES], digest_size=8).digest()
        out.append(prev)
    return tuple(out)


def _chain_start(body: dict[str, Any]) -> bytes:
    """The model name and the cache salt: a LoRA adapter's KV is its own (an instance caches it apart
    from the base model's), and so is a salt's, so equal prompts under either do not share a key.
    Unsalted requests keep the key they had before salts existed."""
    model, salt = body.get("model"), body.get("cache_salt")
    prev = hashlib.blake2b(model.encode("utf-8", "replace"), digest_size=8).digest() if isinstance(model, str) else b""
    if isinstance(salt, str):
        prev = hashlib.blake2b(prev + b"\0salt\0" + salt.encode("utf-8", "replace"), digest_size=8).digest()
    return prev


def _rendering(body: dict[str, Any], prev: bytes) -> bytes:
    """`prev` chained with what else shapes the rendered prompt's start (left as is when the request
    sets none of it, so plain chat requests keep their key)."""
    shaping = {k: body[k] for k in ("chat_template", "chat_template_kwargs", "tools") if body.get(k) is not None}
    if not shaping:
        return prev
    try:
        canon = json.dumps(shaping, sort_keys=True, separators=(",", ":"), default=str)
    except RecursionError:  # nested past what json writes (the instance refuses such a body): keyed as unset
        return prev
    return hashlib.blake2b(prev + b"\0render\0" + canon.encode("utf-8", "replace"), digest_size=8).digest()


def _prompt_bytes(body: dict[str, Any], path: str) -> bytes:
    if path.endswith("/chat/completions"):
        return _turns(body.get("messages"))
    if path.endswith("/responses"):
        given = body.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else given
        if isinstance(items, list) and isinstance(body.get("instructions"), str):
            items = [{"role": "system", "content": body["instructions"]}, *items]
        return _turns(items)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch: its first prompt
    if isinstance(prompt, str):
        return prompt.encode("utf-8", "replace")
    if isinstance(prompt, list) and all(type(t) is int and 0 <= t < 1 << 32 for t in prompt):
        return b"".join(t.to_bytes(4, "little") for t in prompt)
    return b""


def _turns(messages: object) -> bytes:
    """Each message's role (an item's type, when it has none) and text, in order."""
    if not isinstance(messages, list):
        return b""
    parts = []
    for m in messages:
        if isinstance(m, dict):
            parts.append(f"{m.get('role', m.get('type'))}\0{_text(m.get('content', m.get('output')))}\0")
    return "".join(parts).encode("utf-8", "replace")


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
