"""OpenAI-compatible wire models (pydantic v2): requests, responses, stream chunks, errors.

Requests are validated strictly (no "5" -> 5 coercion): a wrong type is a 400, never a guess.
Unknown fields are ignored, as OpenAI-compatible servers do; fields we know but cannot honour
(best_of > 1, suffix) are rejected with a 400 that names them. Tools: server/tools.py. Logprobs of
the generated tokens are supported (`logprobs: k` for completions; `logprobs: true` and
`top_logprobs: k` for chat), as the model's raw distribution (vLLM's default).
vLLM's extensions (`ignore_eos`, `min_tokens`, `stop_token_ids`, `skip_special_tokens`,
`kv_transfer_params`, `structured_outputs`, `guided_*`, `priority`, `return_token_ids`,
`prompt_logprobs`, `truncate_prompt_tokens`, `include_stop_str_in_output`, `allowed_token_ids`,
`bad_words`, `spaces_between_special_tokens`, `return_tokens_as_token_ids`, `cache_salt`,
`use_beam_search` with `length_penalty`, chat's and /tokenize's `chat_template`) are accepted with
vLLM's meaning, and so is OpenAI's `response_format` (engine/structured.py enforces them).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pdserve.engine.sampling_params import MAX_LOGPROBS  # no torch: the proxy imports this module
from pdserve.engine.truncation import check_truncate_prompt_tokens

KVParamsJSON = dict[str, JsonValue]
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]
TopK = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
MAX_N = 16  # most choices one request may ask for
MAX_BATCH_CHOICES = 256  # most prompts x n of one completions request


def _none(value: object) -> bool:
    return value is None


class ParamError(ValueError):
    """A request-level check that fails because of one field: the 400's `param` names it (pydantic
    gives a model validator's error no location)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _truncation(value: int) -> int:
    check_truncate_prompt_tokens(value)  # -1 or at least 1: 0 would leave no prompt
    return value


# vLLM's `truncate_prompt_tokens`: k >= 1 keeps the prompt's last k tokens (after tokenization; chat:
# after the template), -1 as many as the context leaves room for next to max_tokens (engine/truncation.py).
TruncatePromptTokens = Annotated[int, Field(ge=-1), AfterValidator(_truncation)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Request):
    """OpenAI's `response_format.json_schema`."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, JsonValue] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class StructuredOutputsFields(_Request):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: dict[str, JsonValue] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None  # vLLM's
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1  # choices: n engine requests on one prompt
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    user: str | None = None
    # vLLM extensions.
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None  # token id -> bias
    kv_transfer_params: KVParamsJSON | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_*.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: dict[str, JsonValue] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: lower first under --scheduling-policy priority (any other value is a 400 under fcfs).
    priority: Annotated[int, Field(ge=-(2**63), lt=2**63)] = 0
    return_token_ids: bool | None = None  # vLLM's: the prompt's and each choice's token ids in the response
    prompt_logprobs: TopK | None = None  # vLLM's: every prompt token's logprob and its k likeliest alternatives
    truncate_prompt_tokens: TruncatePromptTokens | None = None  # vLLM's: keep the prompt's last k tokens
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended the text stays in it
    allowed_token_ids: Annotated[list[int], Field(min_length=1)] | None = None  # vLLM's: sample only these
    bad_words: list[str] | None = None  # vLLM's: words the output never continues into (engine/bad_words.py)
    spaces_between_special_tokens: bool = True  # vLLM's (model/tokenizer.py's IncrementalDetokenizer)
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs' tokens as "token_id:{id}"
    cache_salt: Annotated[str, Field(min_length=1)] | None = None  # vLLM's: prefix cache shared within a salt
    use_beam_search: bool = False  # vLLM's: `n` beams, ranked by cumulative logprob (server/beam_serving.py)
    length_penalty: Annotated[float, Field(allow_inf_nan=False)] = 1.0  # vLLM's: beams' score = logprob / len**this

    @field_validator("bad_words")
    @classmethod
    def _words_not_blank(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not w.strip() for w in v):
            raise ValueError("each word needs a character other than whitespace")
        return v

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs are not available with stream: true (as in vLLM)")
        return v

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


PromptInput = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`. One prompt: a string, token ids, or a one-element list of either."""

    prompt: PromptInput
    echo: bool = False  # the prompt before the completion (and, with logprobs, its tokens' logprobs)
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0: only with echo (scoring a prompt)
    logprobs: TopK | None = None  # each token's logprob and this many most likely alternatives
    best_of: Literal[1] | None = None
    suffix: None = None
    add_special_tokens: bool = True  # vLLM's: a text prompt gets the tokenizer's BOS etc. (Llama's <|begin_of_text|>)

    @field_validator("max_tokens")
    @classmethod
    def _zero_needs_echo(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens must be at least 1 (0 only with echo: true)")
        return v

    @model_validator(mode="after")
    def _prompts(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ParamError("prompt", "the prompt is empty")
        if isinstance(p, list) and not isinstance(p[0], int) and len(p) * self.n > MAX_BATCH_CHOICES:
            raise ParamError("prompt", f"a batch of {len(p)} prompts x n={self.n} exceeds {MAX_BATCH_CHOICES} choices")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt (a string or token ids), or several (choice index = prompt * n + i)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            return list(p)  # type: ignore[arg-type]
        return [p]  # type: ignore[list-item]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Request):
    """An earlier assistant turn's tool call (multi-turn tool use)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class FunctionDef(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, JsonValue] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


def check_tools(names: list[str], required: bool, named: str | None) -> None:
    """Tools and tool_choice together (chat and responses): distinct function names, a named choice
    among them, "required" with at least one. ValueError otherwise."""
    if len(set(names)) != len(names):
        raise ParamError("tools", "tools: function names must be distinct")
    if named is not None and named not in names:
        raise ParamError("tool_choice", f"tool_choice names {named!r}, which is not among the tools")
    if required and not names:
        raise ParamError("tool_choice", "tool_choice 'required' needs tools")


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: TopK | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without (OpenAI's)
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    # vLLM's: end the prompt inside the final (assistant) message, which the model continues; needs
    # add_generation_prompt false.
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, JsonValue] | None = None  # vLLM's: e.g. {"enable_thinking": false} (Qwen3)
    # vLLM's: this Jinja template in place of the server's (with --trust-request-chat-template only).
    chat_template: str | None = None
    add_special_tokens: bool = False  # vLLM's: templates write the BOS themselves

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        check_tools([t.function.name for t in self.tools or ()], choice == "required", named)
        return self

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def output_limit(self) -> int | None:
        """max_completion_tokens (the newer name) wins over max_tokens; None: up to the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Request):
    """`POST /tokenize` (vLLM's): a completion prompt, or chat messages rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: bool = True  # messages only
    continue_final_message: bool = False  # messages only, as chat's
    chat_template_kwargs: dict[str, JsonValue] | None = None  # messages only
    chat_template: str | None = None  # messages only, as chat's
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages (as the two endpoints)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "give exactly one of prompt and messages")
        return self


class LoadLoRAAdapterRequest(_Request):
    """vLLM's `POST /v1/load_lora_adapter`."""

    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: str


class UnloadLoRAAdapterRequest(_Request):
    """vLLM's `POST /v1/unload_lora_adapter`."""

    lora_name: str
    lora_int_id: int | None = None  # accepted for vLLM's clients; the name decides


class DetokenizeRequest(_Request):
    """`POST /detokenize` (vLLM's)."""

    model: str | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------------
class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Response):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache (OpenAI's field)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


def _now() -> int:
    return int(time.time())


class CompletionLogprobs(_Response):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None: the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    def __add__(self, other: CompletionLogprobs) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=self.tokens + other.tokens, token_logprobs=self.token_logprobs + other.token_logprobs,
            top_logprobs=self.top_logprobs + other.top_logprobs, text_offset=self.text_offset + other.text_offset,
        )


class PromptLogprob(_Response):
    """vLLM's entry of `prompt_logprobs`: a token's logprob at one prompt position."""

    logprob: float
    rank: int | None  # 1: the likeliest token there
    decoded_token: str | None


# vLLM's: None for the first prompt token, then per position token id -> entry (the prompt's own
# token, then the k likeliest).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(_Response):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    # vLLM's, when asked (return_token_ids, prompt_logprobs); streamed: the prompt's on the first chunk.
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_none)
    token_ids: list[int] | None = Field(default=None, exclude_if=_none)  # generated (streamed: this chunk's)
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_none)


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    kv_transfer_params: KVParamsJSON | None = None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_none)
    kv_transfer_params: KVParamsJSON | None = Field(default=None, exclude_if=_none)


class FunctionCallOut(_Response):
    name: str
    arguments: str  # JSON text


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(default=None, exclude_if=_none)  # --reasoning-parser
    tool_calls: list[ToolCallOut] = Field(default_factory=list, exclude_if=lambda v: not v)


class DeltaToolCall(_Response):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = Field(default=None, exclude_if=_none)  # vLLM's return_token_ids


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kv_transfer_params: KVParamsJSON | None = None
    # vLLM's, when asked (return_token_ids, prompt_logprobs): the prompt's, for every choice.
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_none)
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_none)


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_none)
    content: str | None = None
    reasoning_content: str | None = Field(default=None, exclude_if=_none)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=_none)


class ChatChunkChoice(_Response):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = Field(default=None, exclude_if=_none)  # vLLM's return_token_ids: this chunk's


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_none)
    kv_transfer_params: KVParamsJSON | None = Field(default=None, exclude_if=_none)
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_none)  # return_token_ids: the first chunk


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pdserve"
    root: str
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


def openapi_body(model: type[BaseModel]) -> dict:
    """OpenAPI `requestBody` (as a route's `openapi_extra`) for a handler that reads and validates
    its body itself (size limit first), so the schema that clients and fuzzers see still names every
    field; its definitions wait under `x-components` for the app's openapi() to move them."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "x-components": defs}
