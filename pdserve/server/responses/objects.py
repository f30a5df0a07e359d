"""What `/v1/responses` answers: the Response object and its output items, in the shapes of the
`openai` package's `types/responses` (the client parses them into its typed classes)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from pdserve.server.protocol import KVParamsJSON
from pdserve.server.responses.request import FunctionTool, ReasoningConfig, TextConfig, ToolChoice

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]
FINAL: tuple[ResponseStatus, ...] = ("completed", "incomplete", "cancelled", "failed")  # a status no longer changes


def _none(value: object) -> bool:
    return value is None


class WireModel(BaseModel):
    """Output models: every field ours (extra forbidden), JSON by alias (`schema`)."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)


class OutputText(WireModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[JsonValue] = Field(default_factory=list)


class OutputMessage(WireModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCall(WireModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str  # what the client's function_call_output names
    name: str
    arguments: str  # JSON text
    status: ItemStatus


class ReasoningText(WireModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class Reasoning(WireModel):
    """The reply's <think> block (with --reasoning-parser)."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[JsonValue] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


OutputItem = OutputMessage | FunctionCall | Reasoning


class InputTokensDetails(WireModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    cache_write_tokens: int = 0  # OpenAI's explicit prompt caching: none here


class OutputTokensDetails(WireModel):
    reasoning_tokens: int


class ResponseUsage(WireModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int) -> ResponseUsage:
        return cls(
            input_tokens=input_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
            output_tokens=output_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
            total_tokens=input_tokens + output_tokens,
        )


class IncompleteDetails(WireModel):
    reason: Literal["max_output_tokens"]


class ResponseError(WireModel):
    code: Literal["server_error"] = "server_error"
    message: str


class ResponseObject(WireModel):
    """The Response (`object: "response"`); `status` "in_progress" while it streams ("queued" first,
    in the background, until the engine's first output)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ReasoningConfig | None
    temperature: float
    top_p: float
    text: TextConfig
    tool_choice: ToolChoice
    tools: list[FunctionTool]
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    usage: ResponseUsage | None = None
    user: str | None
    metadata: dict[str, str]
    kv_transfer_params: KVParamsJSON | None = Field(default=None, exclude_if=_none)  # vLLM's, for a proxy

    def json_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class DeletedResponse(WireModel):
    """What `DELETE /v1/responses/{id}` answers."""

    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True
