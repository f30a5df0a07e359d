"""The body of `POST /v1/responses` (OpenAI's Responses API, for text models), validated strictly
as the other endpoints' bodies are (server/protocol.py): a wrong type is a 400, never a guess.

Used: `input` (a string, or items: messages whose content is a string or `input_text` /
`output_text` parts, `function_call` and `function_call_output` items; `reasoning` items are
accepted and left out of the prompt), `instructions`, `max_output_tokens`, `temperature`, `top_p`,
`tools` (functions), `tool_choice`, `parallel_tool_calls`, `text.format`, `stream`, `store`,
`previous_response_id`, `background` (with `store` left true), `reasoning.effort` (to the chat
template as `reasoning_effort`, as vLLM does; templates that do not read it ignore it), and vLLM's
`seed`, `top_k`, `min_p`, `repetition_penalty`, `stop`, `ignore_eos`, `structured_outputs`,
`chat_template_kwargs`, `kv_transfer_params`. Echoed, not used: `metadata`, `user`,
`reasoning.summary`. An item's `id` is kept (input_items lists it). Unknown fields are ignored;
fields we know but cannot honour are a 400 that names them: built-in tools, `conversation`,
`prompt`, `truncation: "auto"`, logprobs (`top_logprobs`, `include`), non-text parts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from pdserve.server.protocol import (
    FunctionDef,
    JsonSchemaFormat,
    KVParamsJSON,
    ResponseFormat,
    StructuredOutputsFields,
    check_tools,
)


def _none(value: object) -> bool:
    return value is None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, serialize_by_alias=True)


class TextPart(_Request):
    """A message's text: `input_text` (user, system, developer) or `output_text` (an assistant's
    earlier reply, sent back)."""

    type: Literal["input_text", "output_text"]
    text: str


def _text_parts_only(value: object) -> object:
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
            if kind not in ("input_text", "output_text"):
                raise ValueError(
                    f"content parts of type {kind!r} are not supported: this server takes text only "
                    "(input_text, output_text)"
                )
    return value


Text = Annotated[str | list[TextPart], BeforeValidator(_text_parts_only)]


def _joined(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text
    id: str | None = None

    @property
    def text(self) -> str:
        return _joined(self.content)


class FunctionCallItem(_Request):
    """A call the model made (an earlier response's output, sent back)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    id: str | None = None


class FunctionCallOutputItem(_Request):
    """The result of a call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str
    output: Text
    id: str | None = None

    @property
    def text(self) -> str:
        return _joined(self.output)


class ReasoningItem(_Request):
    """An earlier response's reasoning, sent back: accepted, not put in the prompt (as chat
    templates drop an earlier turn's thinking)."""

    type: Literal["reasoning"]
    id: str | None = None


def _item_type(value: object) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type", "message")  # a message may leave out its type
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item",
        custom_error_message="input items are messages, function_call, function_call_output or reasoning",
    ),
]
ITEM_TAGS = ("message", "function_call", "function_call_output", "reasoning")


class FunctionTool(FunctionDef):
    """A function the model may call (the Responses API's flat shape)."""

    type: Literal["function"]


class FunctionChoice(_Request):
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | FunctionChoice


class TextFormat(_Request):
    """`text.format`: free text, any JSON object, or JSON matching `schema`."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, exclude_if=_none)
    description: str | None = Field(default=None, exclude_if=_none)
    schema_: dict[str, JsonValue] | None = Field(default=None, alias="schema", exclude_if=_none)
    strict: bool | None = Field(default=None, exclude_if=_none)

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a format of type json_schema needs name and schema")
        return self

    @property
    def response_format(self) -> ResponseFormat | None:
        """The same constraint as chat's `response_format` (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        schema = JsonSchemaFormat.model_validate(
            {"name": self.name, "description": self.description, "schema": self.schema_, "strict": self.strict}
        )
        return ResponseFormat(type="json_schema", json_schema=schema)


class TextConfig(_Request):
    format: TextFormat = TextFormat(type="text")
    verbosity: Literal["low", "medium", "high"] | None = Field(default=None, exclude_if=_none)


class ReasoningConfig(_Request):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]


class ResponsesRequest(_Request):
    """`POST /v1/responses`."""

    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None  # a system message before the input (not carried to a continuation)
    previous_response_id: str | None = None
    store: bool | None = None  # None: true, as OpenAI's
    stream: bool = False
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Metadata | None = None
    user: str | None = None
    background: bool | None = None  # run on after the answer (`queued`); GET shows it, cancel stops it
    # Known and refused unless left at their default.
    conversation: JsonValue = None
    prompt: JsonValue = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
    include: list[str] | None = None
    # vLLM's extensions.
    seed: int | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    structured_outputs: StructuredOutputsFields | None = None
    chat_template_kwargs: dict[str, JsonValue] | None = None
    kv_transfer_params: KVParamsJSON | None = None
    cache_salt: Annotated[str, Field(min_length=1)] | None = None  # prefix cache shared within a salt

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, value: object) -> object:
        for i, tool in enumerate(value if isinstance(value, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(
                    f"tools[{i}] is of type {kind!r}: built-in tools are not supported, only functions "
                    "(type 'function')"
                )
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice_only(cls, value: object) -> object:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(
                f"tool_choice of type {value.get('type')!r} is not supported: give 'none', 'auto', "
                "'required' or {'type': 'function', 'name': ...}"
            )
        return value

    @field_validator("background")
    @classmethod
    def _background_is_stored(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("store") is False:
            raise ValueError("a background response is stored (GET shows it): send store true or leave it out")
        return value

    @field_validator("conversation", "prompt")
    @classmethod
    def _not_given(cls, value: JsonValue) -> JsonValue:
        if value is not None:
            raise ValueError("not supported: send the items themselves, or previous_response_id")
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        if value == "auto":
            raise ValueError("truncation 'auto' is not supported: an input beyond the context is a 400")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported on /v1/responses (chat completions has them)")
        return value

    @field_validator("include")
    @classmethod
    def _no_logprobs(cls, value: list[str] | None) -> list[str] | None:
        if value and "message.output_text.logprobs" in value:
            raise ValueError("logprobs are not supported on /v1/responses (chat completions has them)")
        return value

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ResponsesRequest:
        choice = self.tool_choice
        named = choice.name if isinstance(choice, FunctionChoice) else None
        check_tools([t.name for t in self.tools or ()], choice == "required", named)
        return self

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


def client_errors(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """The validation errors that concern what the client sent: without those of a string form it did
    not send (`input`, `content`: a list came) and without the item tags in their locations, so that
    `param` reads `input.0.content`."""

    def member(e: ErrorDetails) -> bool:  # "not a string" when a list was sent
        return e["type"] == "string_type" and e["loc"][-1:] == ("str",) and not isinstance(e["input"], str)

    kept = [
        e
        for e in errors
        if not member(e) or not any(o is not e and o["loc"][: len(e["loc"]) - 1] == e["loc"][:-1] for o in errors)
    ]
    out: list[ErrorDetails] = []
    for e in kept:
        loc = e["loc"]
        tags = {i for i in range(1, len(loc)) if isinstance(loc[i - 1], int) and loc[i] in ITEM_TAGS}
        out.append({**e, "loc": tuple(p for i, p in enumerate(loc) if i not in tags)})
    return out
