"""The Responses API's pieces without a server: request validation (400s naming the field), items to
chat messages, the bounded store, the output assembler's items and events (checked against the
`openai` package's own types, strictly), and the proxy's bodies and prefix key for /v1/responses."""

from __future__ import annotations

import json

import msgspec
import pytest
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from pdserve.proxy import bodies
from pdserve.proxy.prefix_key import prompt_key
from pdserve.server.errors import validation_error
from pdserve.server.protocol import FunctionCallOut
from pdserve.server.responses.conversation import as_input, chat_request, messages
from pdserve.server.responses.items import listed
from pdserve.server.responses.objects import ResponseObject, ResponseUsage
from pdserve.server.responses.output import OutputAssembler
from pdserve.server.responses.request import ResponsesRequest, TextConfig, client_errors
from pdserve.server.responses.store import ResponseStore, StoredResponse

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}


def parse(body: dict) -> ResponsesRequest:
    return ResponsesRequest.model_validate_json(json.dumps(body))


def param_of(body: dict) -> str | None:
    with pytest.raises(ValidationError) as e:
        parse(body)
    return validation_error(client_errors(e.value.errors())).param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": "x", "background": True, "store": False}, "background"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "top_logprobs": 2}, "top_logprobs"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input.0.content"),
        ({"input": [{"type": "web_search_call", "id": "w"}]}, "input.0"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
        ({"input": []}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_unsupported_or_bad_fields_name_the_field(body: dict, param: str | None) -> None:
    assert param_of(body) == param


def test_items_become_chat_turns() -> None:
    """An assistant's text and the calls after it are one turn; a call's output a tool message;
    developer is system; reasoning is left out; instructions come first."""
    req = parse(
        {
            "instructions": "Be brief.",
            "tools": [WEATHER],
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "P"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": '{"t": 21}'},
                {"role": "assistant", "content": "It is 21."},
            ],
        }
    )
    chat = chat_request(req, req.items)
    turns = [(m.role, m.text, [c.function.name for c in m.tool_calls or ()], m.tool_call_id) for m in chat.messages]
    assert turns == [
        ("system", "Be brief.", [], None),
        ("system", "Use tools.", [], None),
        ("user", "a\nb", [], None),
        ("assistant", "Checking.", ["get_weather"], None),
        ("tool", '{"t": 21}', [], "call_1"),
        ("assistant", "It is 21.", [], None),
    ]
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather"
    assert chat.effective_tool_choice == "auto"


def test_listed_items_keep_ids_and_give_the_same_turns() -> None:
    """A stored conversation is kept as listed items (what input_items shows, in the client's types);
    a continuation's prompt is rebuilt from them: the same chat turns as the items sent."""
    req = parse(
        {
            "input": [
                {"role": "developer", "content": "Use tools."},
                {
                    "role": "user",
                    "id": "msg_mine",
                    "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"role": "assistant", "content": "Checking."},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "21"}]},
            ]
        }
    )
    items = listed(req.items)
    dumped = [json.loads(i.model_dump_json(by_alias=True)) for i in items]
    TypeAdapter(list[ResponseItem]).validate_python(dumped)
    assert [d["id"][:3] for d in dumped] == ["msg", "msg", "rs_", "msg", "fc_", "fco"]
    assert dumped[1]["id"] == "msg_mine" and dumped[2]["id"] == "rs_1" and len({d["id"] for d in dumped}) == 6
    assert messages(as_input(items)) == messages(req.items)


def test_request_fields_map_to_chat_fields() -> None:
    req = parse(
        {
            "input": "x",
            "max_output_tokens": 7,
            "temperature": 0.5,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
        }
    )
    chat = chat_request(req, req.items)
    assert (chat.output_limit, chat.temperature, chat.parallel_tool_calls) == (7, 0.5, False)
    assert chat.tool_choice is not None and not isinstance(chat.tool_choice, str)
    assert chat.tool_choice.function.name == "get_weather"
    assert chat.response_format is not None and chat.response_format.json_schema is not None
    assert chat.response_format.json_schema.schema_ == {"type": "object"}
    assert chat.chat_template_kwargs == {"reasoning_effort": "low"}


def _skeleton(**kw: object) -> ResponseObject:
    return ResponseObject(
        id="resp_1",
        created_at=1,
        status="in_progress",
        instructions=None,
        max_output_tokens=None,
        model="m",
        output=[],
        parallel_tool_calls=True,
        previous_response_id=None,
        reasoning=None,
        temperature=1.0,
        top_p=1.0,
        text=TextConfig(),
        tool_choice="auto",
        tools=[],
        user=None,
        metadata={},
        **kw,
    )


def _check(events: list) -> list[str]:
    """Every event as the openai package validates it, numbered 0, 1, ...; their types."""
    dumped = [json.loads(e.model_dump_json(by_alias=True)) for e in events]
    for d in dumped:
        EVENTS.validate_python(d)
    assert [d["sequence_number"] for d in dumped] == list(range(len(dumped)))
    return [d["type"] for d in dumped]


def test_assembler_streams_reasoning_text_and_calls() -> None:
    asm = OutputAssembler(_skeleton())
    events = asm.begin() + asm.reasoning("let me") + asm.reasoning(" see") + asm.content("On") + asm.content(" it.")
    events += asm.call(FunctionCallOut(name="get_weather", arguments='{"city": "P"}'))
    events += asm.finish("completed", ResponseUsage.of(10, 5, 0, 2), None)
    types = _check(events)
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(json.loads(asm.response.json_bytes()))
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "On it." and final.status == "completed"
    assert final.output[2].arguments == '{"city": "P"}'  # type: ignore[union-attr]
    assert asm.reasoning_text == "let me see"


def test_assembler_cut_off_and_empty() -> None:
    """Cut off: the open item and the response are incomplete. Nothing at all: one empty message."""
    asm = OutputAssembler(_skeleton())
    _check(asm.begin() + asm.content("par") + asm.finish("incomplete", ResponseUsage.of(3, 1, 0, 0), None))
    final = Response.model_validate(json.loads(asm.response.json_bytes()))
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens" and final.output[0].status == "incomplete"
    empty = OutputAssembler(_skeleton())
    _check(empty.begin() + empty.finish("completed", ResponseUsage.of(3, 1, 0, 0), {"do_remote_prefill": True}))
    body = json.loads(empty.response.json_bytes())
    assert [o["type"] for o in body["output"]] == ["message"] and body["output"][0]["content"][0]["text"] == ""
    assert body["kv_transfer_params"] == {"do_remote_prefill": True}


def test_assembler_failure() -> None:
    """An engine failure mid-stream: `error`, then `response.failed` with what was output so far."""
    asm = OutputAssembler(_skeleton())
    types = _check(asm.begin() + asm.content("par") + asm.fail("the engine failed"))
    assert types[-2:] == ["error", "response.failed"]
    failed = Response.model_validate(json.loads(asm.response.json_bytes()))
    assert failed.status == "failed" and failed.error is not None and failed.error.message == "the engine failed"


def test_output_goes_back_in_as_the_same_turns() -> None:
    asm = OutputAssembler(_skeleton())
    asm.content("Checking.")
    asm.call(FunctionCallOut(name="f", arguments="{}"))
    asm.finish("completed", ResponseUsage.of(1, 1, 0, 0), None)
    (turn,) = messages(as_input(asm.response.output))
    assert turn.role == "assistant" and turn.text == "Checking." and turn.tool_calls is not None
    assert turn.tool_calls[0].id == asm.response.output[1].call_id  # type: ignore[union-attr]


def test_store_forgets_the_least_recently_used() -> None:
    store = ResponseStore(2)
    entries = [StoredResponse(_skeleton().model_copy(update={"id": f"resp_{i}"}), []) for i in range(3)]
    store.put(entries[0])
    store.put(entries[1])
    assert store.get("resp_0") is entries[0]  # now the most recently used
    store.put(entries[2])
    assert len(store) == 2 and store.get("resp_1") is None and store.get("resp_0") is entries[0]
    none = ResponseStore(0)
    none.put(entries[0])
    assert none.get("resp_0") is None


def test_prefill_half_of_a_response() -> None:
    body = {"input": "hi", "max_output_tokens": 50, "stream": True, "store": True, "previous_response_id": None}
    half = msgspec.json.decode(bodies.prefill_body(body, "/v1/responses", bodies.prefill_params("READ")))
    assert half["max_output_tokens"] == 1 and half["store"] is False and half["stream"] is False
    assert "max_tokens" not in half and half["kv_transfer_params"]["do_remote_decode"] is True


def test_prefix_key_of_a_response() -> None:
    system = "You are a helpful assistant who answers in one short sentence. " * 3
    one = prompt_key({"instructions": system, "input": "first question"}, "/v1/responses")
    two = prompt_key({"instructions": system, "input": [{"role": "user", "content": "second"}]}, "/v1/responses")
    chat = prompt_key(
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "x"}]}, "/v1/chat/completions"
    )
    assert len(one) >= 3 and one[:3] == two[:3] == chat[:3]
