"""Request parsing and error formatting of the OpenAI-compatible server (no engine, no HTTP)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pdserve.server.errors import from_pydantic
from pdserve.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    Usage,
)


def parse(body: object) -> CompletionRequest:
    return CompletionRequest.model_validate_json(json.dumps(body))


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [("hi", ["hi"]), ([1, 2], [[1, 2]]), (["hi"], ["hi"]), ([[1, 2]], [[1, 2]]), (["a", "b"], ["a", "b"]),
     ([[1], [2]], [[1], [2]])],
)
def test_prompt_forms(prompt: object, prompts: object) -> None:
    assert parse({"prompt": prompt}).prompts == prompts


@pytest.mark.parametrize("prompt", [[], [1, "a"], ["a", 1], 3, None, {"a": 1}, ["x"] * 257])
def test_bad_prompts(prompt: object) -> None:
    with pytest.raises(ValidationError):
        parse({"prompt": prompt})
    with pytest.raises(ValidationError):  # 20 prompts x 16 choices: over the batch limit
        parse({"prompt": ["x"] * 20, "n": 16})


def test_defaults_and_extensions() -> None:
    r = parse(
        {
            "prompt": "x",
            "stop": "s",
            "ignore_eos": True,
            "min_tokens": 2,
            "stop_token_ids": [7],
            "kv_transfer_params": {"do_remote_decode": True},
            "stream_options": {"include_usage": True},
            "frequency_penalty": 0,
            "unknown_field": 1,
        }
    )
    assert r.max_tokens == 16 and r.temperature is None and r.n == 1
    assert r.include_usage and not r.continuous_usage
    assert r.kv_transfer_params == {"do_remote_decode": True}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "3"),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -1),
        ("temperature", "0"),
        ("top_p", 1.5),
        ("top_k", -2),
        ("stream", 1),
        ("n", 17),
        ("n", 0),
        ("echo", 1),
        ("suffix", "x"),
        ("logprobs", 21),
        ("logprobs", "1"),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("repetition_penalty", "1.2"),
        ("best_of", 2),
        ("stop", [1]),
        ("kv_transfer_params", [1]),
        ("seed", "1"),
        ("priority", "1"),
        ("priority", 1.5),
        ("priority", True),
        ("priority", 2**63),
        ("prompt_logprobs", 21),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", "2"),
        ("return_token_ids", "yes"),
    ],
)
def test_rejected_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as e:
        parse({"prompt": "x", field: value})
    err = from_pydantic(e.value)
    assert err.status == 400 and err.param == field and field in err.message


def test_vllm_token_fields() -> None:
    r = parse({"prompt": "x", "priority": -3, "return_token_ids": True, "prompt_logprobs": 0})
    assert (r.priority, r.return_token_ids, r.prompt_logprobs) == (-3, True, 0)
    r = parse({"prompt": "x"})
    assert (r.priority, r.return_token_ids, r.prompt_logprobs) == (0, None, None)
    for model in (CompletionRequest, ChatCompletionRequest):  # vLLM refuses them streamed too
        body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "stream": True, "prompt_logprobs": 0}
        with pytest.raises(ValidationError) as e:
            model.model_validate_json(json.dumps(body))
        err = from_pydantic(e.value)
        assert err.param == "prompt_logprobs" and "stream" in err.message


def test_error_for_missing_and_invalid_json() -> None:
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate_json("{}")
    err = from_pydantic(e.value)
    assert (err.param, err.code) == ("prompt", "missing_field")
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate_json("{nope")
    assert from_pydantic(e.value).code == "invalid_json"


def test_union_error_names_the_field_once() -> None:
    with pytest.raises(ValidationError) as e:
        parse({"prompt": 5})
    err = from_pydantic(e.value)
    assert err.param == "prompt" and err.message.startswith("invalid value for 'prompt'")


@pytest.mark.parametrize(("model", "body", "param"), [
    (ChatCompletionRequest, {"top_logprobs": 2}, "top_logprobs"),
    (ChatCompletionRequest, {"tool_choice": "required"}, "tool_choice"),
    (ChatCompletionRequest, {"tools": [{"type": "function", "function": {"name": "f"}}],
                             "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    (ChatCompletionRequest, {"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
    (CompletionRequest, {"prompt": []}, "prompt"),
])
def test_request_level_checks_name_their_field(model: type, body: dict, param: str) -> None:
    """A check across fields (a model validator, which pydantic gives no location) still names the
    field the 400 is about, as OpenAI's error bodies do."""
    if model is ChatCompletionRequest:
        body = {"messages": [{"role": "user", "content": "a"}], **body}
    with pytest.raises(ValidationError) as e:
        model.model_validate_json(json.dumps(body))
    err = from_pydantic(e.value)
    assert (err.param, err.code) == (param, "invalid_value") and err.message and "Value error" not in err.message


def test_chat_request() -> None:
    r = ChatCompletionRequest.model_validate_json(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                    {"role": "assistant", "content": None},
                ],
                "max_tokens": 5,
                "max_completion_tokens": 7,
            }
        )
    )
    assert [m.text for m in r.messages] == ["a\nb", ""]
    assert r.output_limit == 7
    assert (
        ChatCompletionRequest.model_validate_json('{"messages": [{"role": "user", "content": "x"}]}').output_limit
        is None
    )


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": "x"}], "logprobs": 1},
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},  # without logprobs: true
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
    ],
)
def test_chat_rejected(body: object) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate_json(json.dumps(body))


def test_chunks_omit_empty_extras() -> None:
    chunk = CompletionChunk(id="c", model="m", choices=[CompletionChoice(text="x")])
    d = json.loads(chunk.model_dump_json())
    assert "usage" not in d and "kv_transfer_params" not in d and d["choices"][0]["finish_reason"] is None
    usage = CompletionChunk(id="c", model="m", choices=[], usage=Usage.of(3, 4))
    assert json.loads(usage.model_dump_json())["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},  # OpenAI's shape: always there
    }
    first = ChatCompletionChunk(
        id="c", model="m", choices=[ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))]
    )
    assert json.loads(first.model_dump_json())["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    later = ChatCompletionChunk(id="c", model="m", choices=[ChatChunkChoice(delta=DeltaMessage(content="y"))])
    assert json.loads(later.model_dump_json())["choices"][0]["delta"] == {"content": "y"}


def test_full_response_always_carries_kv_transfer_params() -> None:
    r = CompletionResponse(
        id="c", model="m", choices=[CompletionChoice(text="x", finish_reason="stop")], usage=Usage.of(1, 1)
    )
    assert json.loads(r.model_dump_json())["kv_transfer_params"] is None
