"""Everything a handler needs, held by the app (`app.state.ctx`): engine, settings, metrics, admission."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from starlette.requests import Request

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.lora_request import LoRARequest
from pdserve.server.admission import Admission
from pdserve.server.beam_search import BeamSearchRun
from pdserve.server.generation import Generation, GenerationInput
from pdserve.server.metrics import ServerMetrics
from pdserve.server.request_log import log_request
from pdserve.server.responses.background import BackgroundRuns
from pdserve.server.responses.store import ResponseStore
from pdserve.server.settings import ServerSettings
from pdserve.server.tool_parsers import ToolParser, make_tool_parser
from pdserve.server.vllm_metrics import VllmInfo


@dataclass
class ServerContext:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics = field(init=False)
    admission: Admission = field(init=False)
    tool_parser: ToolParser = field(init=False)  # --tool-call-parser
    responses: ResponseStore = field(init=False)  # stored /v1/responses (--max-stored-responses)
    background: BackgroundRuns = field(init=False)  # running background /v1/responses (stored when they end)
    generations: dict[str, Generation] = field(init=False, default_factory=dict)  # also keeps tasks alive
    beam_searches: dict[str, BeamSearchRun] = field(init=False, default_factory=dict)  # server/beam_serving.py
    # Loaded LoRA adapters by name (a request names one in `model`); changed on the event loop only,
    # from what the engine thread reports after each load or unload.
    loras: dict[str, LoRARequest] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.tool_parser = make_tool_parser(self.settings.tool_call_parser)
        self.responses = ResponseStore(self.settings.max_stored_responses)
        self.background = BackgroundRuns(self.responses)
        self.loras = {lo.lora_name: lo for lo in self.llm.list_loras()}
        self.admission = Admission(self.llm.config.scheduler.max_num_seqs, self.settings.max_queued_requests)
        self.metrics = ServerMetrics(lambda: self.engine.stats, lambda: self.admission.num_in_flight, self._vllm_info())
        if self.metrics.vllm is not None:
            self.llm.on_iteration = self.metrics.vllm.iteration_tokens.observe  # on the engine thread, per step
        connector = self.llm.connector
        if connector is not None:
            self.metrics.attach_kv(lambda: connector.stats)

    def _vllm_info(self) -> VllmInfo:
        llm, config = self.llm, self.llm.config
        cache = {f.name: str(getattr(config.cache, f.name)) for f in dataclasses.fields(config.cache)}
        cache["num_gpu_blocks"] = str(llm.block_pool.num_usable)  # vLLM's name for the cache's blocks
        spec = config.speculative if llm.proposer is not None else None
        return VllmInfo(
            model_name=self.settings.model_name,
            max_model_len=llm.max_model_len,
            cache_config=cache,
            max_loras=config.lora.max_loras if config.lora.enable_lora else None,
            num_speculative_tokens=spec.num_speculative_tokens if spec is not None else None,
        )

    @property
    def llm(self) -> LLMEngine:
        return self.engine.engine

    @property
    def ready(self) -> bool:
        """Serving: the engine is up and no drain has begun."""
        return not self.admission.draining and self.engine.is_alive

    def begin_drain(self) -> None:
        """Refuse new requests (503) from now on; in-flight ones go on."""
        self.admission.draining = True

    def abort_all(self) -> None:
        for gen in list(self.generations.values()):
            gen.abort()
        for run in list(self.beam_searches.values()):
            run.abort()

    def start(self, inp: GenerationInput, after: asyncio.Event | None = None) -> Generation:
        """Admit (APIError 503 / 409 / 429) and start the request's generation task (its engine
        request once `after` is set, when given)."""
        self.admission.admit(inp.request_id)
        if self.settings.enable_log_requests:
            log_request(inp.request_id, inp.token_ids, inp.pooling or inp.params, inp.lora, self.settings.max_log_len)
        gen = Generation(self.engine, self.metrics, inp, self._done, after)
        self.generations[inp.request_id] = gen
        return gen

    def _done(self, request_id: str) -> None:
        self.admission.release(request_id)
        self.generations.pop(request_id, None)


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx
