"""OpenAI's Responses API (`/v1/responses`) with the official `openai` client against a real
`pdserve serve` (with `--reasoning-parser qwen3`), then through `pdserve proxy` in standard mode and
in disagg mode (READ: a prefill and a decode instance). Every streamed event is validated strictly
against the client's own types; tool calls are made deterministic by tool_choice "required" (a
grammar) and a fixed seed. Background responses: polled to their end, cancelled (their KV blocks
freed), streamed and picked up again from a cursor, deleted; input_items paged by the client."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.e2e.conftest import TINY_MODEL, ServerProcess, free_port, launch, pdserve_argv, pdserve_server

EVENTS = TypeAdapter(ResponseStreamEvent)
SERVE = ("--reasoning-parser", "qwen3")
ASK = {"model": TINY_MODEL, "instructions": "Be brief.", "input": "Hello there", "temperature": 0.0}
CITY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 8}},
}
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": CITY,
        "strict": True,
    }
]
LONG = {
    "model": TINY_MODEL,
    "input": "Go on",
    "max_output_tokens": 3000,
    "temperature": 0.0,  # cancelled early
    "extra_body": {"ignore_eos": True},
}
CALL = {
    "model": TINY_MODEL,
    "input": "What is the weather in Paris?",
    "tools": TOOLS,
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "max_output_tokens": 120,
    "temperature": 1.0,
    "extra_body": {"seed": 2},
}


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(module_tmp, *SERVE) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return _client(server)


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0, timeout=60)


def _streamed(client: openai.OpenAI, **kw: object) -> tuple[list[str], Response]:
    """Stream a response: every event valid as the client's types say, numbered 0, 1, ...; the
    event types and the final response (that of `response.completed`)."""
    events = list(client.responses.create(stream=True, **kw))  # type: ignore[call-overload]
    for e in events:
        EVENTS.validate_python(e.model_dump(mode="json"))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == final.output_text
    return types, final


def test_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    full = client.responses.create(max_output_tokens=12, **ASK)  # type: ignore[arg-type]
    Response.model_validate(full.model_dump(mode="json"))  # strictly the client's type
    assert full.id.startswith("resp_") and full.object == "response" and full.status == "incomplete"
    assert full.incomplete_details is not None and full.incomplete_details.reason == "max_output_tokens"
    assert full.output_text and [o.type for o in full.output] == ["message"]
    assert full.instructions == "Be brief." and full.temperature == 0.0 and full.max_output_tokens == 12
    usage = full.usage
    assert usage is not None and usage.output_tokens == 12 and usage.total_tokens == usage.input_tokens + 12
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0
    types, final = _streamed(client, max_output_tokens=12, **ASK)
    assert final.output_text == full.output_text and final.status == "incomplete"
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    with client.responses.stream(max_output_tokens=12, **ASK) as stream:  # type: ignore[arg-type]
        for _ in stream:
            pass
        assert stream.get_final_response().output_text == full.output_text


def test_stop_completes_and_max_output_tokens_cuts(client: openai.OpenAI) -> None:
    text = client.responses.create(max_output_tokens=12, **ASK).output_text  # type: ignore[arg-type]
    stopped = client.responses.create(max_output_tokens=12, extra_body={"stop": [text[4:6]]}, **ASK)  # type: ignore[arg-type]
    assert stopped.status == "completed" and stopped.incomplete_details is None
    assert stopped.output_text == text[: text.index(text[4:6])]
    assert stopped.output[0].status == "completed"  # type: ignore[union-attr]


def _call(response: Response) -> tuple[str, str, str]:
    (call,) = [o for o in response.output if o.type == "function_call"]
    return call.name, call.arguments, call.call_id


def test_function_call_round_trip(client: openai.OpenAI) -> None:
    """tool_choice "required": one call, streamed or not; its output goes back as an item."""
    first = client.responses.create(**CALL)  # type: ignore[call-overload]
    name, arguments, call_id = _call(first)
    assert first.status == "completed" and name == "get_weather" and set(json.loads(arguments)) == {"city"}
    assert call_id.startswith("call_") and first.tool_choice == "required" and first.tools[0].name == "get_weather"
    types, streamed = _streamed(client, **CALL)
    assert _call(streamed)[:2] == (name, arguments)
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    named = client.responses.create(**{**CALL, "tool_choice": {"type": "function", "name": "get_weather"}})  # type: ignore[call-overload]
    assert _call(named)[0] == "get_weather"
    back = [
        {"role": "user", "content": CALL["input"]},
        *[o.model_dump(mode="json") for o in first.output],
        {"type": "function_call_output", "call_id": call_id, "output": '{"temperature": 21}'},
    ]
    answer = client.responses.create(
        model=TINY_MODEL,
        input=back,
        tools=TOOLS,
        max_output_tokens=4,  # type: ignore[arg-type]
        temperature=0.0,
    )
    assert answer.output_text and not [o for o in answer.output if o.type == "function_call"]
    assert answer.usage is not None and first.usage is not None
    assert answer.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_previous_response_id_continues_and_get_returns_it(client: openai.OpenAI, server: ServerProcess) -> None:
    """A continuation is its conversation sent again whole, but for the first one's instructions,
    which are not carried over (OpenAI's rule): the same prompt and greedy text. The stored response
    comes back from GET; store: false keeps nothing."""
    first = client.responses.create(max_output_tokens=6, **ASK)  # type: ignore[arg-type]
    more = {"model": TINY_MODEL, "input": "Tell me more.", "max_output_tokens": 6, "temperature": 0.0}
    cont = client.responses.create(previous_response_id=first.id, **more)  # type: ignore[arg-type]
    whole = [
        {"role": "user", "content": ASK["input"]},
        *[o.model_dump(mode="json") for o in first.output],
        {"role": "user", "content": "Tell me more."},
    ]
    again = client.responses.create(**{**more, "input": whole})  # type: ignore[arg-type]
    alone = client.responses.create(**more)  # type: ignore[arg-type]
    assert cont.previous_response_id == first.id and cont.output_text == again.output_text
    assert cont.usage is not None and again.usage is not None and alone.usage is not None
    assert cont.usage.input_tokens == again.usage.input_tokens > alone.usage.input_tokens
    assert client.responses.retrieve(cont.id).model_dump() == cont.model_dump()
    streamed = _streamed(client, previous_response_id=cont.id, **more)[1]
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    gone = client.responses.create(store=False, **{**ASK, "max_output_tokens": 2})  # type: ignore[arg-type]
    r = httpx.get(f"{server.v1_url}/responses/{gone.id}", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["param"] == "response_id"
    r = httpx.post(f"{server.v1_url}/responses", json={**more, "previous_response_id": gone.id}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


def test_reasoning_and_json_format(client: openai.OpenAI) -> None:
    """--reasoning-parser: a think block (a regex makes the random model write one) is a reasoning
    item; text.format json_schema constrains the output as chat's response_format does."""
    regex = {"structured_outputs": {"regex": "<think>\\n[a-z]{6}\\n</think>\\n\\n[a-z]{4}"}, "seed": 3}
    kw = {"model": TINY_MODEL, "input": "Think first.", "max_output_tokens": 60, "temperature": 1.0}
    r = client.responses.create(extra_body=regex, **kw)  # type: ignore[call-overload]
    assert [o.type for o in r.output] == ["reasoning", "message"] and len(r.output_text) == 4
    assert r.output[0].content[0].text.isalpha() and len(r.output[0].content[0].text) == 6  # type: ignore[union-attr,index]
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 6
    types, streamed = _streamed(client, extra_body=regex, **kw)
    assert "response.reasoning_text.delta" in types and [o.type for o in streamed.output] == ["reasoning", "message"]
    assert streamed.output[0].content == r.output[0].content and streamed.output_text == r.output_text  # type: ignore[union-attr]
    schema = {"type": "object", "additionalProperties": False, "required": ["city"], "properties": CITY["properties"]}
    fmt = {"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}}
    j = client.responses.create(text=fmt, extra_body={"seed": 9}, **kw)  # type: ignore[call-overload]
    assert j.status == "completed" and set(json.loads(j.output_text)) == {"city"}
    assert j.text is not None and j.text.format is not None and j.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search_preview"}]}, "tools"),
        ({"background": True, "store": False}, "background"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]},
            "input.0.content",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, "text.format"),
        ({"input": "x" * 5000}, "input"),
        ({"model": "nope"}, "model"),
    ],
)
def test_bad_requests_are_400(server: ServerProcess, body: dict, param: str | None) -> None:
    r = httpx.post(f"{server.v1_url}/responses", json={"input": "hi", **body}, timeout=30)
    assert r.status_code == (404 if param == "model" else 400), r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


@contextlib.contextmanager
def _proxy(tmp: Path, *args: str) -> Iterator[ServerProcess]:
    port = free_port()
    argv = pdserve_argv("proxy", "--port", str(port), "--no-registry", "--health-interval", "0.2", *args)
    with launch(argv, port, tmp / f"proxy-{port}.log") as proxy:
        yield proxy


@pytest.fixture(scope="module", params=["standard", "disagg"])
def proxied(
    request: pytest.FixtureRequest, module_tmp: Path, server: ServerProcess
) -> Iterator[tuple[ServerProcess, list[ServerProcess]]]:
    """A proxy and the instances that store responses behind it (standard: the module's server;
    disagg READ: a new prefill and decode pair)."""
    if request.param == "standard":
        with _proxy(module_tmp, "--mode", "standard", "--instance", server.base_url) as p:
            yield p, [server]
        return
    halves = ("--kv-mode", "read", *SERVE)
    with (
        pdserve_server(module_tmp, "--role", "prefill", *halves) as pre,
        pdserve_server(module_tmp, "--role", "decode", *halves) as dec,
        _proxy(module_tmp, "--kv-mode", "read", "--prefill", pre.base_url, "--decode", dec.base_url) as p,
    ):
        yield p, [dec, pre]


def test_through_the_proxy(proxied: tuple[ServerProcess, list[ServerProcess]], client: openai.OpenAI) -> None:
    """The standalone's text, streamed or not; disagg: the prompt's KV moved, and only the decode
    half was stored. GET and previous_response_id find the instance that stores the response."""
    proxy, (keeper, *others) = proxied
    via = _client(proxy)
    want = client.responses.create(max_output_tokens=10, **ASK)  # type: ignore[arg-type]
    got = via.responses.create(max_output_tokens=10, **ASK)  # type: ignore[arg-type]
    assert got.output_text == want.output_text and got.usage is not None and want.usage is not None
    assert got.usage.input_tokens == want.usage.input_tokens
    assert _streamed(via, max_output_tokens=10, **ASK)[1].output_text == want.output_text
    assert _call(via.responses.create(**CALL))[:2] == _call(client.responses.create(**CALL))[:2]  # type: ignore[call-overload]
    assert via.responses.retrieve(got.id).output_text == got.output_text
    assert _client(keeper).responses.retrieve(got.id).id == got.id
    for other in others:  # the prefill half was sent store: false
        assert httpx.get(f"{other.v1_url}/responses/{got.id}", timeout=10).status_code == 404
    if others:
        assert keeper.metrics()["pdserve_kv_transfers_total"] >= 2
    more = {"model": TINY_MODEL, "input": "Tell me more.", "max_output_tokens": 6, "temperature": 0.0}
    cont = via.responses.create(previous_response_id=got.id, **more)  # type: ignore[arg-type]
    assert cont.output_text == client.responses.create(previous_response_id=want.id, **more).output_text  # type: ignore[arg-type]
    r = httpx.post(f"{proxy.v1_url}/responses", json={**more, "previous_response_id": "resp_unknown"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    r = httpx.get(f"{proxy.v1_url}/responses/resp_unknown", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


def _until(client: openai.OpenAI, response_id: str, statuses: tuple[str, ...], timeout: float = 60) -> Response:
    """Poll GET until the response's status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    while (got := client.responses.retrieve(response_id)).status not in statuses:
        assert time.monotonic() < deadline, f"{response_id} still {got.status}"
        time.sleep(0.02)
    return got


ENDED = ("completed", "incomplete", "failed", "cancelled")


def _blocks_free(*servers: ServerProcess) -> None:
    for s in servers:
        total = s.metrics()["pdserve_kv_blocks_total"]
        s.wait_metrics({"pdserve_kv_blocks_free": total, "pdserve_num_requests_running": 0})


def _background_round(via: openai.OpenAI, client: openai.OpenAI, holders: list[ServerProcess]) -> None:
    """What a client of background responses does, through `via`; `holders`: the instances whose
    blocks must all be free again after a cancel."""
    want = client.responses.create(max_output_tokens=10, **ASK)  # type: ignore[arg-type]
    bg = via.responses.create(background=True, max_output_tokens=10, **ASK)  # type: ignore[arg-type]
    assert bg.status in ("queued", "in_progress") and bg.background is True and not bg.output
    done = _until(via, bg.id, ENDED)
    assert done.status == "incomplete" and done.output_text == want.output_text and done.background is True
    assert via.responses.cancel(bg.id).model_dump() == done.model_dump()  # ended: answered as it is
    (item,) = list(via.responses.input_items.list(bg.id))
    assert item.type == "message" and item.role == "user" and item.content[0].text == ASK["input"]  # type: ignore[union-attr]
    long = via.responses.create(background=True, **LONG)  # type: ignore[call-overload]
    _until(via, long.id, ("in_progress",))
    cancelled = via.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.usage is not None and cancelled.usage.output_tokens < 3000
    _blocks_free(*holders)
    assert via.responses.retrieve(long.id).status == "cancelled"
    assert via.responses.delete(long.id) is None
    for gone in (
        lambda: via.responses.retrieve(long.id),
        lambda: via.responses.delete(long.id),
        lambda: via.responses.cancel(long.id),
        lambda: list(via.responses.input_items.list(long.id)),
    ):
        with pytest.raises(openai.NotFoundError):
            gone()
    foreground = via.responses.create(max_output_tokens=2, **ASK)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        via.responses.cancel(foreground.id)  # not a background response


def test_background_poll_cancel_delete(client: openai.OpenAI, server: ServerProcess) -> None:
    _background_round(client, client, [server])


def test_input_items_are_paged_by_the_client(client: openai.OpenAI) -> None:
    """The conversation of a continuation, last item first by default; the client follows `after`."""
    first = client.responses.create(max_output_tokens=4, **ASK)  # type: ignore[arg-type]
    more = {"model": TINY_MODEL, "input": "Tell me more.", "max_output_tokens": 4, "temperature": 0.0}
    cont = client.responses.create(previous_response_id=first.id, **more)  # type: ignore[arg-type]
    items = list(client.responses.input_items.list(cont.id, limit=1))  # one page per item
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"), ("message", "user")]  # type: ignore[union-attr]
    assert items[1].id == first.output[0].id and items[0].content[0].text == "Tell me more."  # type: ignore[union-attr]
    asc = client.responses.input_items.list(cont.id, order="asc")
    assert [i.id for i in asc.data] == [i.id for i in items][::-1] and asc.has_more is False
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(cont.id, limit=101)


def _follow(stream: Iterator[object], stop_after: int | None = None) -> list[dict]:
    out: list[dict] = []
    for e in stream:
        out.append(e.model_dump(mode="json"))  # type: ignore[attr-defined]
        EVENTS.validate_python(out[-1])
        if stop_after is not None and len(out) > stop_after:
            break
    return out


def _streamed_background(via: openai.OpenAI) -> None:
    """A streamed background response: the client leaves after a few events, the response runs on,
    GET ?stream=true&starting_after=n gives the rest (OpenAI's cursor)."""
    stream = via.responses.create(stream=True, background=True, max_output_tokens=12, **ASK)  # type: ignore[call-overload]
    first = _follow(stream, stop_after=3)
    stream.close()
    assert [e["type"] for e in first[:2]] == ["response.created", "response.queued"]
    response_id = first[0]["response"]["id"]
    done = _until(via, response_id, ENDED)
    rest = _follow(via.responses.retrieve(response_id, stream=True, starting_after=3))
    assert [e["sequence_number"] for e in first + rest] == list(range(len(first) + len(rest)))
    assert rest[-1]["type"] == "response.completed" and rest[-1]["response"]["output"][0]["content"][0]["text"] == (
        done.output_text
    )


def test_streamed_background_picked_up_again(client: openai.OpenAI) -> None:
    _streamed_background(client)


def test_background_through_the_proxy(
    proxied: tuple[ServerProcess, list[ServerProcess]], client: openai.OpenAI
) -> None:
    """The same through the proxy: the create call returns at once, every later call finds the
    instance that holds the response (disagg: the decode; the prefill's blocks are free too)."""
    proxy, instances = proxied
    via = _client(proxy)
    _background_round(via, client, instances)
    _streamed_background(via)
