"""Wire models of `POST /v1/embeddings` (OpenAI's, with vLLM's `normalize`, `add_special_tokens` and
`truncate_prompt_tokens`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pdserve.server.protocol import MAX_BATCH_CHOICES, PromptInput, TruncatePromptTokens


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # as protocol.py's: a wrong type is a 400


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingRequest(_Request):
    """One input (a string or token ids) or a batch of them (a list of either); at most
    MAX_BATCH_CHOICES inputs."""

    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None  # Matryoshka: the first this many, re-normalized
    user: str | None = None
    normalize: bool = True  # vLLM's: L2-normalize the vector
    add_special_tokens: bool = True  # vLLM's: a text input gets the tokenizer's special tokens
    truncate_prompt_tokens: TruncatePromptTokens | None = None  # vLLM's: keep each input's last k tokens (-1: context)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: PromptInput) -> PromptInput:
        if isinstance(v, list) and not v:
            raise ValueError("the input is empty")
        if isinstance(v, list) and not isinstance(v[0], int) and len(v) > MAX_BATCH_CHOICES:
            raise ValueError(f"a batch of {len(v)} inputs exceeds {MAX_BATCH_CHOICES}")
        return v

    @property
    def inputs(self) -> list[str | list[int]]:
        """The batch: one input, or several (data index = input index)."""
        p = self.input
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            return list(p)  # type: ignore[arg-type]
        return [p]  # type: ignore[list-item]


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
