"""Token counts for the benchmark's prompts: the server's own tokenizer, or a local one.

A dataset's prompts are text; filtering them (ShareGPT's length limits) and reporting their lengths
needs the model's tokenizer, and so does turning random token ids into text for a chat endpoint.

- `ServerTokenizer` (the default) asks the server under test: vLLM's `POST /tokenize` and
  `POST /detokenize`, which pdserve (and its proxy) and vLLM both serve. Nothing to install or
  point at, and the counts are exactly the server's (a `dummy:` model's byte tokenizer included);
  chat messages are rendered with the server's own chat template.
- `LocalTokenizer` (`--tokenizer PATH`) reads a Hugging Face tokenizer directory (tokenizer.json,
  tokenizer_config.json's chat template) with the `tokenizers` library, for a server without those
  routes. It must be the served model's tokenizer, or the counts are of another model's tokens.

Both are batch-oriented async interfaces, so that many texts are tokenized concurrently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol, TypeVar

import aiohttp
import msgspec

from pdserve.model.tokenizer import Tokenizer

_CONCURRENCY = 32  # requests in flight to /tokenize and /detokenize
_TIMEOUT_S = 120.0
T = TypeVar("T")


class BenchTokenizer(Protocol):
    """What prompts.py needs of a tokenizer."""

    @property
    def tokenizer_id(self) -> str:
        """Names the tokenizer in the result JSON (vLLM's `tokenizer_id`)."""
        ...

    async def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each text (with the tokenizer's BOS etc. when `add_special_tokens`)."""
        ...

    async def encode_chat(self, contents: Sequence[str]) -> list[list[int]]:
        """Token ids of each text sent as one user message, rendered with the chat template and its
        generation prompt (what a chat request with that message is prefilled with)."""
        ...

    async def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """The text of each token id sequence (special tokens kept)."""
        ...


class _Tokenized(msgspec.Struct):
    tokens: list[int]


class _Detokenized(msgspec.Struct):
    prompt: str


class ServerTokenizer:
    """The server's `/tokenize` and `/detokenize` (vLLM's routes), over the benchmark's session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, model: str, api_key: str | None = None):
        self._session, self._base, self._model = session, base_url.rstrip("/"), model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._gate = asyncio.Semaphore(_CONCURRENCY)

    @property
    def tokenizer_id(self) -> str:
        return f"{self._base}/tokenize"

    async def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        bodies = [{"model": self._model, "prompt": t, "add_special_tokens": add_special_tokens} for t in texts]
        return [r.tokens for r in await self._all("/tokenize", bodies, _Tokenized)]

    async def encode_chat(self, contents: Sequence[str]) -> list[list[int]]:
        bodies = [
            {"model": self._model, "messages": [{"role": "user", "content": c}], "add_generation_prompt": True}
            for c in contents
        ]
        return [r.tokens for r in await self._all("/tokenize", bodies, _Tokenized)]

    async def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        bodies = [{"model": self._model, "tokens": list(t)} for t in ids]
        return [r.prompt for r in await self._all("/detokenize", bodies, _Detokenized)]

    async def _all(self, path: str, bodies: list[dict[str, object]], kind: type[T]) -> list[T]:
        return list(await asyncio.gather(*(self._post(path, b, kind) for b in bodies)))

    async def _post(self, path: str, body: dict[str, object], kind: type[T]) -> T:
        url = self._base + path
        async with self._gate:
            try:
                async with self._session.post(
                    url, json=body, headers=self._headers, timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S)
                ) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        hint = (
                            " (does the server have vLLM's tokenizer routes? else pass --tokenizer PATH)"
                            if resp.status in (404, 405)
                            else ""
                        )
                        text = raw.decode(errors="replace").strip()[:300]
                        raise RuntimeError(f"POST {url} -> HTTP {resp.status}{hint}: {text}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise RuntimeError(f"POST {url} failed: {type(e).__name__}: {e}") from e
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.DecodeError as e:
            raise RuntimeError(f"POST {url}: unexpected answer ({e}): {raw[:300]!r}") from e


class LocalTokenizer:
    """A Hugging Face tokenizer directory (`--tokenizer PATH`), read with the `tokenizers` library."""

    def __init__(self, path: str) -> None:
        """FileNotFoundError when `path` has no tokenizer.json; ValueError when it cannot be read."""
        self._path = path
        try:
            self._tok = Tokenizer.from_dir(path)
        except FileNotFoundError:
            raise
        except Exception as e:  # a corrupt tokenizer.json / tokenizer_config.json
            raise ValueError(f"cannot read the tokenizer in {path!r}: {e}") from e

    @property
    def tokenizer_id(self) -> str:
        return self._path

    async def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        return [self._tok.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    async def encode_chat(self, contents: Sequence[str]) -> list[list[int]]:
        rendered = [
            self._tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
            for c in contents
        ]
        return [self._tok.encode(r, add_special_tokens=False) for r in rendered]

    async def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [self._tok.decode(t, skip_special_tokens=False) for t in ids]
