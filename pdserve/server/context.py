"""Everything a handler needs, held by the app (`app.state.ctx`): engine, settings, metrics, admission."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.server.admission import Admission
from pdserve.server.generation import Generation, GenerationInput
from pdserve.server.metrics import ServerMetrics
from pdserve.server.settings import ServerSettings


@dataclass
class ServerContext:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics = field(init=False)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.llm.config.scheduler.max_num_seqs, self.settings.max_queued_requests)
        self.metrics = ServerMetrics(lambda: self.engine.stats, lambda: self.admission.num_in_flight)

    @property
    def llm(self) -> LLMEngine:
        return self.engine.engine

    @property
    def ready(self) -> bool:
        """Serving: the engine is up and no drain has begun."""
        return not self.admission.draining

    def begin_drain(self) -> None:
        """Refuse new requests (503) from now on; in-flight ones go on."""
        self.admission.draining = True

    def abort_all(self) -> None:
        for request_id in list(self.admission.in_flight):
            self.engine.abort(request_id)

    def start(self, inp: GenerationInput) -> Generation:
        return Generation.start(self.engine, self.admission, self.metrics, inp)


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx
