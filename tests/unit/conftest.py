"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pdserve.config import CacheConfig, EngineConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    """dummy:qwen3-tiny on a 64-block cache, one per test module (a module may define its own)."""
    llm = LLMEngine(EngineConfig(model="dummy:qwen3-tiny", cache=CacheConfig(num_kv_blocks=64)))
    eng = AsyncEngine(llm)
    yield eng
    eng.shutdown()
    llm.close()
