"""Per-request pooling parameters (vLLM's `PoolingParams`): what an embedding request returns."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.config import PoolingType
from pdserve.engine.truncation import check_truncate_prompt_tokens


@dataclass(frozen=True)
class PoolingParams:
    """An embedding request: its prompt is computed (prefill only) and pooled into one vector.

    `pooling_type`: "last" (the last prompt token's final hidden state) or "mean" (over every prompt
    token); None takes the engine's (`--pooling-type`). `dimensions`: keep the first this many
    values (Matryoshka truncation), before `normalize` (L2, the default). `truncate_prompt_tokens`
    (vLLM's): keep only the prompt's last k tokens (-1: as many as the context holds)."""

    pooling_type: PoolingType | None = None
    normalize: bool = True
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.pooling_type not in (None, "last", "mean"):
            raise ValueError(f"pooling_type must be 'last' or 'mean', got {self.pooling_type!r}")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")
        check_truncate_prompt_tokens(self.truncate_prompt_tokens)

    @property
    def needs_every_token(self) -> bool:
        """Mean pooling needs every prompt token's hidden state computed here: no prefix-cache hits."""
        return self.pooling_type == "mean"
