"""Server settings: built once from the CLI (or by a test), frozen."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.config import (
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_STORED_RESPONSES,
    DEFAULT_PORT,
    FrontendConfig,
    Role,
)

DEFAULT_MAX_QUEUED_REQUESTS = 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_TOOL_CALL_PARSER = "hermes"


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP layer needs to know; the engine has its own EngineConfig."""

    served_model_names: tuple[str, ...]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    role: Role = "standalone"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queued_requests: int | None = DEFAULT_MAX_QUEUED_REQUESTS  # None: no limit
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    reasoning_parser: str | None = None  # reasoning.PARSERS: split <think> blocks into reasoning_content
    tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER  # tool_parsers.TOOL_PARSERS: the format of tool calls
    max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES  # /v1/responses store (LRU); 0: store none
    chat_template: str | None = None  # --chat-template's Jinja source, in place of the tokenizer's; None: its own
    # vLLM's --trust-request-chat-template: a request may bring its own chat_template (else a 400).
    trust_request_chat_template: bool = False
    frontend: FrontendConfig = field(default_factory=FrontendConfig)  # CORS, TLS, root path, uvicorn logging
    # vLLM's --enable-log-requests: one INFO line per engine request as it starts (server/request_log.py),
    # its prompt token ids cut to --max-log-len (None: all).
    enable_log_requests: bool = False
    max_log_len: int | None = None

    @property
    def model_name(self) -> str:
        """The name reported in responses and listed first by /v1/models."""
        return self.served_model_names[0]
