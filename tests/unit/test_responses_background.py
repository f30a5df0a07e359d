"""Background responses and the routes after a create call, in process (httpx's ASGI transport) over a
real tiny engine, each test in one event loop (a background run lives in it): queued -> completed,
cancel (the engine request aborted, its blocks freed), an engine failure -> "failed", a streamed one
followed again from a cursor, delete, and input_items' paging and 400s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter

from pdserve.config import CacheConfig, EngineConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.server.app import build_app
from pdserve.server.context import ServerContext
from pdserve.server.responses.event_log import EventLog
from pdserve.server.settings import ServerSettings
from tests.unit.test_server_app import fail_after

MODEL = "dummy:qwen3-tiny"
EVENTS = TypeAdapter(ResponseStreamEvent)
ITEMS = TypeAdapter(list[ResponseItem])
ASK = {"input": "Hello there", "max_output_tokens": 8, "temperature": 0.0}
LONG = {"input": "Go on", "max_output_tokens": 3000, "ignore_eos": True, "temperature": 0.0}
Client = httpx.AsyncClient


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    llm = LLMEngine(EngineConfig(model=MODEL, cache=CacheConfig(num_kv_blocks=256)))
    eng = AsyncEngine(llm)
    yield eng
    eng.shutdown()
    llm.close()


@pytest.fixture
def ctx(engine: AsyncEngine) -> Iterator[ServerContext]:
    yield ServerContext(engine, ServerSettings(served_model_names=(MODEL,)))
    engine.engine.__dict__.pop("step", None)  # undo a failing step installed by a test


def run(ctx: ServerContext, body: Callable[[Client], Awaitable[None]]) -> None:
    async def main() -> None:
        transport = httpx.ASGITransport(app=build_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://test/v1", timeout=30) as c:
            await body(c)
            await asyncio.wait_for(_settled(ctx), 10)

    asyncio.run(main())


async def _settled(ctx: ServerContext) -> None:
    while len(ctx.background) or ctx.admission.num_in_flight:
        await asyncio.sleep(0.01)


async def poll(c: Client, response_id: str, until: Callable[[dict], bool]) -> dict:
    while not until(got := (await c.get(f"/responses/{response_id}")).json()):
        await asyncio.sleep(0.01)
    return got


def free(ctx: ServerContext) -> bool:
    """Every KV block free again (cached ones count: they are reclaimed on demand)."""
    pool = ctx.llm.block_pool
    return pool.num_free == pool.num_usable


def test_background_answers_queued_then_completes(ctx: ServerContext) -> None:
    async def body(c: Client) -> None:
        want = (await c.post("/responses", json=ASK)).json()
        r = await c.post("/responses", json={**ASK, "background": True})
        assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["background"] is True
        assert r.json()["output"] == []
        done = await poll(c, r.json()["id"], lambda g: g["status"] not in ("queued", "in_progress"))
        Response.model_validate(done)
        assert done["status"] == "incomplete" and done["output"] == [
            {**want["output"][0], "id": done["output"][0]["id"]}
        ]
        assert done["usage"]["output_tokens"] == 8
        again = await c.post(f"/responses/{done['id']}/cancel")  # ended: answered as it is
        assert again.status_code == 200 and again.json() == done
        fg = await c.post(f"/responses/{want['id']}/cancel")
        assert fg.status_code == 400 and fg.json()["error"]["param"] == "response_id"
        assert (await c.post("/responses/resp_nope/cancel")).status_code == 404

    run(ctx, body)


def test_cancel_aborts_the_engine_request_and_frees_its_blocks(ctx: ServerContext) -> None:
    async def body(c: Client) -> None:
        r = (await c.post("/responses", json={**LONG, "background": True})).json()
        await poll(c, r["id"], lambda g: g["status"] == "in_progress")
        cont = await c.post("/responses", json={**ASK, "previous_response_id": r["id"]})
        assert cont.status_code == 400 and "still running" in cont.json()["error"]["message"]
        cancelled = await c.post(f"/responses/{r['id']}/cancel")
        assert cancelled.status_code == 200
        got = cancelled.json()
        assert got["status"] == "cancelled" and 0 < got["usage"]["output_tokens"] < 3000
        assert got["output"][0]["status"] == "incomplete"
        assert free(ctx) and not ctx.llm.scheduler.running
        assert (await c.get(f"/responses/{r['id']}")).json() == got
        assert (await c.post(f"/responses/{r['id']}/cancel")).json() == got  # idempotent

    run(ctx, body)


def test_engine_failure_makes_a_failed_response(ctx: ServerContext) -> None:
    fail_after(ctx.engine, 2)

    async def body(c: Client) -> None:
        r = (await c.post("/responses", json={**LONG, "background": True})).json()
        done = await poll(c, r["id"], lambda g: g["status"] not in ("queued", "in_progress"))
        assert done["status"] == "failed" and "simulated device failure" in done["error"]["message"]
        Response.model_validate(done)

    run(ctx, body)


async def _events(lines: AsyncIterator[str], stop_after: int | None = None) -> list[dict]:
    out: list[dict] = []
    async for line in lines:
        if line.startswith("data: "):
            out.append(json.loads(line[len("data: ") :]))
            EVENTS.validate_python(out[-1])
            if stop_after is not None and len(out) > stop_after:
                break
    return out


def test_streamed_background_is_followed_again_from_a_cursor(ctx: ServerContext) -> None:
    """The client leaves after a few events; the response runs on; GET ?stream=true&starting_after=n
    gives the events after n, to the end: the same events the first stream would have had."""

    async def body(c: Client) -> None:
        req = {**ASK, "max_output_tokens": 20, "ignore_eos": True, "background": True, "stream": True}
        async with c.stream("POST", "/responses", json=req) as r:
            first = await _events(r.aiter_lines(), stop_after=3)
        assert [e["type"] for e in first[:2]] == ["response.created", "response.queued"]
        assert first[0]["response"]["status"] == "queued"
        response_id = first[0]["response"]["id"]
        done = await poll(c, response_id, lambda g: g["status"] == "incomplete")
        async with c.stream("GET", f"/responses/{response_id}?stream=true&starting_after=3") as r:
            rest = await _events(r.aiter_lines())
        async with c.stream("GET", f"/responses/{response_id}?stream=true") as r:
            whole = await _events(r.aiter_lines())
        assert whole[:4] == first and whole[4:] == rest
        assert [e["sequence_number"] for e in whole] == list(range(len(whole)))
        assert [e["type"] for e in whole][:3] == ["response.created", "response.queued", "response.in_progress"]
        assert rest[-1]["type"] == "response.completed"
        assert rest[-1]["response"] == done
        plain = (await c.post("/responses", json=ASK)).json()
        r2 = await c.get(f"/responses/{plain['id']}?stream=true")
        assert r2.status_code == 400 and r2.json()["error"]["param"] == "stream"
        bad = await c.get(f"/responses/{response_id}?starting_after=x")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"

    run(ctx, body)


def test_delete_then_gone_everywhere(ctx: ServerContext) -> None:
    async def body(c: Client) -> None:
        done = (await c.post("/responses", json=ASK)).json()
        r = await c.delete(f"/responses/{done['id']}")
        assert r.status_code == 200 and r.json() == {"id": done["id"], "object": "response", "deleted": True}
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/input_items")):
            gone = await c.request(method, f"/responses/{done['id']}{path}")
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "response_not_found"
        cont = await c.post("/responses", json={**ASK, "previous_response_id": done["id"]})
        assert cont.status_code == 400 and cont.json()["error"]["param"] == "previous_response_id"
        running = (await c.post("/responses", json={**LONG, "background": True})).json()
        assert (await c.delete(f"/responses/{running['id']}")).status_code == 200
        assert (await c.get(f"/responses/{running['id']}")).status_code == 404
        await asyncio.wait_for(_settled(ctx), 10)
        assert free(ctx) and ctx.responses.get(running["id"]) is None  # stopped, and not stored when it ended

    run(ctx, body)


def test_input_items_pages_the_whole_conversation(ctx: ServerContext) -> None:
    async def body(c: Client) -> None:
        items = [
            {"role": "developer", "content": "Be brief."},
            {
                "type": "message",
                "role": "user",
                "id": "msg_mine",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
            },
        ]
        first = (await c.post("/responses", json={**ASK, "input": items, "instructions": "not an item"})).json()
        second = (await c.post("/responses", json={**ASK, "input": "more", "previous_response_id": first["id"]})).json()
        listed = (await c.get(f"/responses/{second['id']}/input_items", params={"order": "asc"})).json()
        ITEMS.validate_python(listed["data"])
        assert [(i["type"], i.get("role")) for i in listed["data"]] == [
            ("message", "developer"),
            ("message", "user"),
            ("message", "assistant"),
            ("message", "user"),
        ]
        assert listed["data"][1]["id"] == "msg_mine" and listed["data"][2]["id"] == first["output"][0]["id"]
        assert listed["data"][1]["content"] == items[1]["content"] and listed["has_more"] is False
        ids = [i["id"] for i in listed["data"]]
        assert (listed["first_id"], listed["last_id"]) == (ids[0], ids[-1])
        page = (await c.get(f"/responses/{second['id']}/input_items", params={"limit": 3})).json()
        assert [i["id"] for i in page["data"]] == ids[::-1][:3] and page["has_more"] is True
        rest = (await c.get(f"/responses/{second['id']}/input_items", params={"after": page["last_id"]})).json()
        assert [i["id"] for i in rest["data"]] == ids[:1] and rest["has_more"] is False
        end = (await c.get(f"/responses/{second['id']}/input_items", params={"after": ids[0]})).json()
        assert end == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
        for params, param in (
            ({"limit": 0}, "limit"),
            ({"limit": "x"}, "limit"),
            ({"limit": 101}, "limit"),
            ({"order": "up"}, "order"),
            ({"after": "msg_unknown"}, "after"),
        ):
            bad = await c.get(f"/responses/{second['id']}/input_items", params=params)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text

    run(ctx, body)


def test_background_needs_the_store(engine: AsyncEngine) -> None:
    ctx = ServerContext(engine, ServerSettings(served_model_names=(MODEL,), max_stored_responses=0))

    async def body(c: Client) -> None:
        r = await c.post("/responses", json={**ASK, "background": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "background"
        r = await c.post("/responses", json={**ASK, "background": True, "store": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "background"

    run(ctx, body)


def test_event_log_followers() -> None:
    async def main() -> None:
        log = EventLog()
        log.append(b"0")
        late = asyncio.ensure_future(_collect(log.follow(0)))
        log.append(b"1")
        await asyncio.sleep(0)
        log.append(b"2")
        log.close()
        assert await late == [b"1", b"2"]
        assert await _collect(log.follow()) == [b"0", b"1", b"2"] and await _collect(log.follow(2)) == []

    asyncio.run(main())


async def _collect(frames: AsyncIterator[bytes]) -> list[bytes]:
    return [f async for f in frames]
