"""pdserve: prefill-decode disaggregated LLM serving."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "PoolingParams", "LoRARequest", "RequestOutput", "CompletionOutput",
           "EmbeddingOutput", "BeamSearchParams"]


def __getattr__(name: str):
    # Lazy: `import pdserve` stays cheap for the proxy and the bench client (no torch import).
    if name == "LLM":
        from pdserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pdserve.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "PoolingParams":
        from pdserve.engine.pooling_params import PoolingParams

        return PoolingParams
    if name == "LoRARequest":
        from pdserve.engine.lora_request import LoRARequest

        return LoRARequest
    if name == "BeamSearchParams":
        from pdserve.engine.beam_search import BeamSearchParams

        return BeamSearchParams
    if name in ("RequestOutput", "CompletionOutput", "EmbeddingOutput"):
        from pdserve.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
