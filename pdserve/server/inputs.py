"""From a validated request to what the engine takes: prompt token ids and SamplingParams.

Everything the engine would refuse is refused here first, as a 400 with the engine's message,
before any response byte is sent (a stream cannot change its status code once started).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from pdserve.config import Role
from pdserve.engine.chat import ChatTemplateError, ContinueFinalMessageError, render_chat, template_turn
from pdserve.engine.engine import LLMEngine
from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.sampling_params import SamplingDefaults, SamplingParams, StructuredOutputs
from pdserve.kv.factory import parse_kv_transfer_params
from pdserve.kv.messages import KVTransferParams
from pdserve.server.errors import APIError
from pdserve.server.protocol import ChatMessage, CompletionRequest, KVParamsJSON, SamplingFields
from pdserve.server.settings import ServerSettings


def sampling_params(
    req: SamplingFields, max_tokens: int | None, logprobs: int | None = None, prompt_logprobs: int | None = None,
    defaults: SamplingDefaults | None = None,
) -> SamplingParams:
    """The engine's SamplingParams of a request; a field it leaves out takes `defaults` (the model's
    generation config), else the OpenAI default."""
    try:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers as strings)", code="invalid_value",
                       param="logit_bias") from None
    d = (defaults or SamplingDefaults()).fill(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
    )
    try:
        return SamplingParams(
            max_tokens=d["max_tokens"],
            min_tokens=req.min_tokens,
            temperature=1.0 if d["temperature"] is None else d["temperature"],
            top_p=1.0 if d["top_p"] is None else d["top_p"],
            top_k=0 if d["top_k"] is None else d["top_k"],
            min_p=0.0 if d["min_p"] is None else d["min_p"],
            seed=req.seed,
            stop=req.stop or (),
            stop_token_ids=req.stop_token_ids or (),
            ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if d["repetition_penalty"] is None else d["repetition_penalty"],
            logit_bias=bias,
            structured_outputs=structured_outputs(req),
            truncate_prompt_tokens=req.truncate_prompt_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _constraints(req: SamplingFields) -> list[tuple[str, dict[str, Any]]]:
    """(field, StructuredOutputs keywords) of every output constraint the request sets, in the
    order: OpenAI's response_format, vLLM's structured_outputs, then its older guided_* fields."""

    def schema(value: object) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    out: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        out.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
        out.append(("response_format", {"json": json.dumps(rf.json_schema.schema_)}))
    so = req.structured_outputs
    if so is not None:
        out.append(("structured_outputs", {"json": None if so.json_ is None else schema(so.json_),
                                           "json_object": bool(so.json_object), "regex": so.regex,
                                           "choice": so.choice, "grammar": so.grammar}))
    given = {"guided_json": ("json", None if req.guided_json is None else schema(req.guided_json)),
             "guided_regex": ("regex", req.guided_regex), "guided_choice": ("choice", req.guided_choice),
             "guided_grammar": ("grammar", req.guided_grammar)}
    out += [(field, {key: value}) for field, (key, value) in given.items() if value is not None]
    return out


def structured_outputs(req: SamplingFields) -> StructuredOutputs | None:
    """The one output constraint of a request; a 400 naming the field when it is malformed or not alone."""
    found = _constraints(req)
    if len(found) > 1:
        raise APIError(400, f"give one output constraint, not {' and '.join(f for f, _ in found)}",
                       code="invalid_value", param=found[1][0])
    if not found:
        return None
    field, kw = found[0]
    try:
        return StructuredOutputs(**kw)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value", param=field) from None


def completion_prompts(engine: LLMEngine, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt of the request (before `truncated`)."""
    tok = engine.tokenizer
    return [tok.encode(p, add_special_tokens=req.add_special_tokens) if isinstance(p, str) else list(p)
            for p in req.prompts]


def truncated(engine: LLMEngine, token_ids: list[int], params: SamplingParams | PoolingParams) -> list[int]:
    """A prompt's ids as the engine takes them: its last `truncate_prompt_tokens` when the request
    asks (every endpoint's prompts pass here); a k the context cannot hold is a 400 naming the field."""
    try:
        return engine.truncate_prompt(token_ids, params)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value", param="truncate_prompt_tokens") from None


@dataclass(frozen=True)
class ChatTemplate:
    """The template a chat request renders with: `source` (None: the tokenizer's own) and the
    request field a failure to render is blamed on."""

    source: str | None = None
    param: str = "messages"


def chat_template(
    settings: ServerSettings, requested: str | None, template_kwargs: dict[str, Any] | None
) -> ChatTemplate:
    """The request's own chat_template (vLLM's, also as chat_template_kwargs' "chat_template"),
    which needs --trust-request-chat-template (a 400 naming it otherwise); else --chat-template's;
    else the tokenizer's."""
    field = "chat_template" if requested is not None else "chat_template_kwargs"
    if requested is None and template_kwargs is not None:
        requested = template_kwargs.get("chat_template")  # type: ignore[assignment]
        if requested is not None and not isinstance(requested, str):
            raise APIError(400, "chat_template_kwargs' chat_template must be a string", code="invalid_value",
                           param=field)
    if requested is None:
        return ChatTemplate(settings.chat_template)
    if not settings.trust_request_chat_template:
        raise APIError(400, "a chat template came with the request, but the server runs without "
                       "--trust-request-chat-template: refused", code="invalid_value", param=field)
    return ChatTemplate(requested, field)


def chat_prompt(
    engine: LLMEngine, messages: list[ChatMessage], add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
    add_special_tokens: bool = False, template: ChatTemplate = ChatTemplate(), continue_final_message: bool = False,
) -> list[int]:
    """The messages rendered with `template` (`chat_template`'s choice; by default the model's
    chat template), with `tools` and the request's chat_template_kwargs when given, tokenized
    (without the tokenizer's BOS unless asked: the template writes it). A template that does not
    compile or render is a 400 naming `template.param`. `continue_final_message` (vLLM's): the
    prompt ends inside the final message, which the model continues."""
    turns = [_turn(m) for m in messages]
    try:
        text = render_chat(engine.tokenizer, turns, add_generation_prompt, continue_final_message, tools=tools,
                           template_kwargs=template_kwargs, chat_template=template.source)
    except ChatTemplateError as e:
        raise APIError(400, str(e), code="invalid_value", param=template.param) from None
    except ContinueFinalMessageError as e:
        raise APIError(400, str(e), code="invalid_value", param="continue_final_message") from None
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value", param="chat_template_kwargs") from None
    return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _turn(m: ChatMessage) -> dict[str, Any]:
    """One message as chat templates take it (`template_turn`)."""
    calls = [{"id": c.id, "function": {"name": c.function.name, "arguments": c.function.arguments}}
             for c in m.tool_calls or ()]
    return template_turn(m.role, m.text, calls, m.tool_call_id, m.name)


async def validate_constraint(engine: LLMEngine, params: SamplingParams, req: SamplingFields) -> None:
    """Compile the output constraint's grammar (a large schema takes a while: off the event loop)."""
    if params.structured_outputs is None:
        return
    try:
        await asyncio.to_thread(engine.structured.validate, params.structured_outputs)
    except ValueError as e:
        found = _constraints(req)  # else the constraint is chat's tool_choice
        raise APIError(400, str(e), code="invalid_value", param=found[0][0] if found else "tool_choice") from None


def validate(engine: LLMEngine, token_ids: list[int], params: SamplingParams) -> None:
    """The engine's own checks: empty prompt, ids out of vocabulary, context length, cache size
    (the output constraint: `validate_constraint`)."""
    try:
        engine.validate_prompt(token_ids, params)
    except ValueError as e:
        msg = str(e)
        code = "context_length_exceeded" if "context length" in msg else "invalid_value"
        fields = ("max_tokens", "logit_bias", "allowed_token_ids", "bad_words")
        param = next((f for f in fields if msg.startswith(f)), "prompt")
        raise APIError(400, msg, code=code, param=param) from None


def kv_transfer_params(role: Role, value: KVParamsJSON | None) -> KVTransferParams | None:
    """Parse the request's kv_transfer_params (typed), and refuse what this instance's role cannot do."""
    try:
        kvp = parse_kv_transfer_params(value)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value", param="kv_transfer_params") from None
    if role == "standalone" and kvp is not None and (kvp.do_remote_decode or kvp.do_remote_prefill):
        raise APIError(
            400,
            "this instance runs --role standalone: it neither sends nor receives KV",
            code="invalid_value",
            param="kv_transfer_params",
        )
    return kvp
