"""The official `openai` client against a real `pdserve serve` process."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import TINY_MODEL, ServerProcess, pdserve_server

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0.0, "seed": 7}


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(module_tmp) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [TINY_MODEL]


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=12, **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage is not None
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(PROMPT.encode()), 12)
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    assert full.id.startswith("cmpl-") and full.object == "text_completion"

    chunks = list(
        client.completions.create(
            model=TINY_MODEL,
            prompt=PROMPT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text and text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_completion_token_ids_prompt(client: openai.OpenAI) -> None:
    ids = list(PROMPT.encode())
    by_text = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model=TINY_MODEL, prompt=ids, max_tokens=6, **GREEDY)
    nested = client.completions.create(model=TINY_MODEL, prompt=[ids], max_tokens=6, **GREEDY)
    assert by_text.choices[0].text == by_ids.choices[0].text == nested.choices[0].text


def test_vllm_extensions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=TINY_MODEL,
        prompt=PROMPT,
        max_tokens=20,
        **GREEDY,
        extra_body={"min_tokens": 20, "ignore_eos": True, "kv_transfer_params": {"do_remote_decode": False}},
    )
    assert r.usage is not None and r.usage.completion_tokens == 20
    # Echoed at the top level, as vLLM does (the engine's view of them: defaults omitted).
    assert r.model_extra is not None and isinstance(r.model_extra["kv_transfer_params"], dict)
    plain = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=1)
    assert plain.model_extra is not None and plain.model_extra["kv_transfer_params"] is None


def test_stop_string(client: openai.OpenAI) -> None:
    base = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=12, **GREEDY).choices[0].text
    stop = base[3:5]
    r = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=12, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    full = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=10, **GREEDY)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.object == "chat.completion"
    assert full.usage is not None and full.usage.completion_tokens == 10

    stream = client.chat.completions.create(
        model=TINY_MODEL,
        messages=messages,
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_text_parts(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "a\nb"}], max_tokens=5, **GREEDY
    )
    parts = client.chat.completions.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=5,
        **GREEDY,
    )
    assert plain.choices[0].message.content == parts.choices[0].message.content


def test_request_id_header(server: ServerProcess) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2}
    r = httpx.post(f"{server.v1_url}/completions", json=body, headers={"X-Request-Id": "my-id-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-id-1"
    assert r.json()["id"] == "cmpl-my-id-1"
    generated = httpx.post(f"{server.v1_url}/completions", json=body).headers["x-request-id"]
    assert generated and generated != "my-id-1"


def test_64_concurrent_streams(server: ServerProcess) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await client.completions.create(
            model=TINY_MODEL,
            prompt=f"{PROMPT} {i}",
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
        text, tokens = "", 0
        async for c in stream:
            if c.choices:
                text += c.choices[0].text
            if c.usage:
                tokens = c.usage.completion_tokens
        return text, tokens

    async def main() -> list[tuple[str, int]]:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=100), timeout=60)
        async with openai.AsyncOpenAI(base_url=server.v1_url, api_key="x", http_client=http, max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64 and all(tokens == 16 for _, tokens in results)
    m = server.wait_metrics({"pdserve_num_requests_running": 0, "pdserve_num_requests_waiting": 0})
    assert m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]
    assert m['pdserve_requests_total{finish_reason="length"}'] >= 64
    assert m["pdserve_time_to_first_token_seconds_count"] >= 64


def test_completion_logprobs(client: openai.OpenAI) -> None:
    full = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=8, logprobs=3, **GREEDY)
    lp = full.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(v <= 0.0 for v in lp.token_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # Greedy: the sampled token is the most likely one (distinct ids may share a text: <= 3 keys).
        assert 1 <= len(top) <= 3 and top[token] == value == max(top.values())
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    stream = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=8, logprobs=3, stream=True,
                                       **GREEDY)
    tokens, values = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens or []
            values += chunk.choices[0].logprobs.token_logprobs or []
    assert tokens == lp.tokens and values == pytest.approx(lp.token_logprobs, abs=1e-5)

    plain = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=6,  # type: ignore[arg-type]
                                          logprobs=True, top_logprobs=2, **GREEDY)
    content = full.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and full.usage is not None and len(content) == full.usage.completion_tokens == 6
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob == item.logprob <= 0.0
        assert item.top_logprobs[1].logprob <= item.logprob
        assert item.bytes == list(item.token.encode())

    stream = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=6,  # type: ignore[arg-type]
                                            logprobs=True, stream=True, **GREEDY)
    streamed = [i for c in stream if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content or []]
    assert [i.token for i in streamed] == [i.token for i in content]
    assert all(i.top_logprobs == [] for i in streamed)  # logprobs: true alone: no alternatives
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-5)


def test_penalties_change_the_greedy_text(client: openai.OpenAI) -> None:
    """The tiny random model repeats itself within 80 greedy tokens; each penalty breaks that (the arithmetic
    itself is unit-tested in tests/unit/test_penalties.py)."""
    def text(**kw: object) -> str:
        r = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=80, **GREEDY, **kw)  # type: ignore[call-overload]
        return r.choices[0].text

    plain = text()
    penalised = {
        "presence": text(presence_penalty=2.0),
        "frequency": text(frequency_penalty=2.0),
        "repetition": text(extra_body={"repetition_penalty": 100.0}),
    }
    assert all(t and t != plain for t in penalised.values()), penalised
    assert text(presence_penalty=2.0) == penalised["presence"]  # still deterministic


def test_tokenize_and_detokenize(server: ServerProcess, client: openai.OpenAI) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        tok = http.post("/tokenize", json={"prompt": PROMPT}).json()
        done = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=1)
        assert done.usage is not None and tok["count"] == len(tok["tokens"]) == done.usage.prompt_tokens
        assert tok["max_model_len"] > 0
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": PROMPT}

        messages = [{"role": "user", "content": PROMPT}]
        chat_tok = http.post("/tokenize", json={"messages": messages, "model": TINY_MODEL}).json()
        chat = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=1)  # type: ignore[arg-type]
        assert chat.usage is not None and chat_tok["count"] == chat.usage.prompt_tokens > tok["count"]

        for body, path, param in [
            ({"prompt": "a", "messages": messages}, "/tokenize", "prompt"),
            ({}, "/tokenize", "prompt"),
            ({"prompt": 5}, "/tokenize", "prompt"),
            ({"tokens": [1, 10**9]}, "/detokenize", "tokens"),
            ({"tokens": "abc"}, "/detokenize", "tokens"),
        ]:
            r = http.post(path, json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, r.json()
        assert http.post("/tokenize", json={"prompt": "a", "model": "nope"}).status_code == 404


def test_echo_with_logprobs_scores_the_prompt(server: ServerProcess, client: openai.OpenAI) -> None:
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens 0."""
    prompt_ids = httpx.post(f"{server.base_url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    scored = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, **GREEDY)
    choice = scored.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    assert scored.usage.prompt_tokens == len(prompt_ids)
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(prompt_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0.0 for v in lp.token_logprobs[1:])
    assert lp.text_offset is not None and lp.text_offset[:2] == [0, len(lp.tokens[0])]

    # With generated tokens: the prompt's part, then the same completion as without echo.
    plain = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=5, logprobs=1, **GREEDY)
    both = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=5, echo=True, logprobs=1, **GREEDY)
    assert both.choices[0].text == PROMPT + plain.choices[0].text
    assert both.choices[0].logprobs.token_logprobs[: len(prompt_ids)] == pytest.approx(lp.token_logprobs)  # type: ignore[union-attr]
    assert both.choices[0].logprobs.tokens[len(prompt_ids):] == plain.choices[0].logprobs.tokens  # type: ignore[union-attr,index]

    stream = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=5, echo=True, logprobs=1,
                                       stream=True, **GREEDY)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == both.choices[0].text
    assert [t for c in chunks for t in (c.logprobs.tokens or [])] == both.choices[0].logprobs.tokens  # type: ignore[union-attr]


def test_n_choices(client: openai.OpenAI) -> None:
    """n engine requests on one prompt: seeded choices differ (choice i draws from seed + i), and a
    stream interleaves the choices by index to the same texts."""
    kw = {"model": TINY_MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 3}
    full = client.completions.create(**kw)  # type: ignore[call-overload]
    assert [c.index for c in full.choices] == [0, 1, 2]
    texts = [c.text for c in full.choices]
    assert len(set(texts)) > 1 and all(texts)
    assert full.usage is not None and full.usage.completion_tokens == 18
    one = client.completions.create(**{**kw, "n": 1})  # type: ignore[call-overload]
    assert one.choices[0].text == texts[0]

    streamed = ["", "", ""]
    usage = None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):  # type: ignore[call-overload]
        for c in chunk.choices:
            streamed[c.index] += c.text
        usage = chunk.usage or usage
    assert streamed == texts and usage is not None and usage.completion_tokens == 18

    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=4, n=2, **GREEDY)  # type: ignore[arg-type]
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same
    stream = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=4, n=2, stream=True,  # type: ignore[arg-type]
                                            **GREEDY)
    parts: dict[int, str] = {0: "", 1: ""}
    roles = set()
    for chunk in stream:
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.add(c.index)
    assert roles == {0, 1} and parts[0] == parts[1] == chat.choices[0].message.content


def test_logit_bias(server: ServerProcess, client: openai.OpenAI) -> None:
    token = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "A"}).json()["tokens"]
    assert len(token) == 1
    r = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=5, logit_bias={str(token[0]): 100},
                                  **GREEDY)
    assert r.choices[0].text == "AAAAA"


def test_prefix_cache_reports_cached_tokens(server: ServerProcess, client: openai.OpenAI) -> None:
    """A prompt sharing a long prefix with an earlier one reuses its KV: usage says how many prompt
    tokens came from the cache (whole 16-token blocks), /metrics counts the hits, the text is the
    same as the first time."""
    system = "You are a careful assistant who answers in one short sentence. " * 3  # 192 bytes = tokens
    before = server.metrics()
    first = client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "system", "content": system},
                                           {"role": "user", "content": "Name a colour."}], max_tokens=8, **GREEDY)
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "system", "content": system},
                                            {"role": "user", "content": "Name a fruit."}], max_tokens=8, **GREEDY)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(system) - 16 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    stream = client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "system", "content": system},
                                            {"role": "user", "content": "Name a colour."}], max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16  # all but the last
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    after = server.metrics()
    hits = after["pdserve_prefix_cache_hits_total"] - before["pdserve_prefix_cache_hits_total"]
    assert hits == cached + usage.prompt_tokens_details.cached_tokens
    assert after["pdserve_kv_blocks_cached"] > 0


def test_reset_prefix_cache(server: ServerProcess, client: openai.OpenAI) -> None:
    """vLLM's POST /reset_prefix_cache: the next identical prompt finds nothing cached."""
    prompt = "A prompt repeated to fill, then empty, the prefix cache. " * 2

    def cached() -> int:
        r = client.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=1, **GREEDY)
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return r.usage.prompt_tokens_details.cached_tokens

    cached()
    assert cached() > 0
    r = httpx.post(server.base_url + "/reset_prefix_cache", timeout=10)
    assert r.status_code == 200 and r.json()["forgotten_blocks"] > 0
    assert cached() == 0


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 150},
                         "member": {"type": "boolean"}}}


def test_structured_outputs(server: ServerProcess, client: openai.OpenAI) -> None:
    """response_format (json_object, json_schema), vLLM's structured_outputs and guided_* fields: the
    random model's sampled output obeys the constraint, streamed or not, chat or completions."""
    sampled = {"temperature": 1.0, "seed": 11, "max_tokens": 80}
    messages = [{"role": "user", "content": "Describe a person."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=TINY_MODEL, messages=messages, response_format=fmt, **sampled)  # type: ignore[arg-type]
    person = json.loads(r.choices[0].message.content or "")
    assert set(person) == {"name", "age", "member"} and len(person["name"]) <= 6
    assert isinstance(person["age"], int) and isinstance(person["member"], bool)
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=TINY_MODEL, messages=messages, response_format=fmt,  # type: ignore[arg-type]
                                            stream=True, **sampled)
    assert json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)) == person
    r = httpx.post(server.v1_url + "/completions", timeout=60, json={  # a seed whose object is not {}
        "prompt": PROMPT, "response_format": {"type": "json_object"}, **sampled, "seed": 4, "max_tokens": 300})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and len(json.loads(choice["text"])) >= 1, choice
    for extra, check in [
        ({"guided_regex": r"[a-f]{4}-[0-9]{3}"}, lambda t: re.fullmatch(r"[a-f]{4}-[0-9]{3}", t)),
        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_json": PERSON}, lambda t: set(json.loads(t)) == set(PERSON["properties"])),
        ({"guided_grammar": 'start: "id-" NUM\nNUM: /[0-9]{2,4}/'}, lambda t: re.fullmatch(r"id-[0-9]{2,4}", t)),
        ({"guided_grammar": 'root ::= "v" [0-9] "." [0-9]'}, lambda t: re.fullmatch(r"v[0-9]\.[0-9]", t)),
    ]:
        r = client.completions.create(model=TINY_MODEL, prompt=PROMPT, extra_body=extra, **sampled)
        assert check(r.choices[0].text), (extra, r.choices[0].text)


@pytest.mark.parametrize(("body", "param"), [
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_json": {"type": 5}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_schema"}}, None),
    ({"response_format": {"type": "xml"}}, None),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_grammar": "start: ("}, "guided_grammar"),
])
def test_bad_structured_outputs_are_400(server: ServerProcess, body: dict, param: str | None) -> None:
    r = httpx.post(server.v1_url + "/completions", timeout=30, json={"prompt": PROMPT, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param), err


def test_logprobs_of_tokens_a_grammar_forbids_are_finite(client: openai.OpenAI) -> None:
    """Under a constraint most alternatives have probability 0: reported as -9999 (JSON has no -inf)."""
    r = client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": "pick"}],
                                       max_tokens=4, logprobs=True, top_logprobs=3,
                                       extra_body={"guided_choice": ["ab"]}, **GREEDY)
    assert r.choices[0].message.content == "ab" and r.choices[0].logprobs is not None
    content = r.choices[0].logprobs.content or []
    assert [c.logprob for c in content] == [0.0, 0.0]
    assert all(t.logprob == -9999.0 for c in content for t in c.top_logprobs[1:])
    c = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=4, logprobs=2,
                                  extra_body={"guided_choice": ["ab"]}, **GREEDY)
    lp = c.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None and -9999.0 in lp.top_logprobs[0].values()


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 8}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["tz"],
        "properties": {"tz": {"enum": ["UTC", "CET"]}}}}},
]


def _streamed_calls(chunks: list) -> list[tuple[str, str]]:
    """The calls as a streaming client puts them together: by index, the first delta of each call
    opening it (id, type "function", name), the arguments joined over its deltas. Checks that every
    call but the last came out before the chunk that ends the reply (the last may complete it)."""
    calls: dict[int, list[str]] = {}
    for c in chunks:
        for t in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if t.index not in calls:
                assert t.index == len(calls) and t.id and t.type == "function" and t.function and t.function.name
                calls[t.index] = [t.function.name, ""]
            else:
                assert t.id is None and t.function and t.function.name is None  # later deltas: arguments only
            calls[t.index][1] += t.function.arguments or ""
    ends = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason is not None]
    early = {t.index for c in chunks[:ends[-1]] if c.choices for t in c.choices[0].delta.tool_calls or []}
    assert early >= set(range(len(calls) - 1))
    return [(name, args) for name, args in calls.values()]


def _check_tool_calls(client: openai.OpenAI, tool_choice: object, parallel: bool, seed: int = 2
                      ) -> list[tuple[str, dict]]:
    """The reply to tool_choice "required" / named is tool calls (finish_reason "tool_calls" unless
    cut off) whose arguments obey the function's schema; streamed with the same seed, the client
    puts together the very same calls, argument strings included. Returns (name, arguments)."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = {"model": TINY_MODEL, "messages": messages, "tools": TOOLS, "tool_choice": tool_choice,
          "parallel_tool_calls": parallel, "max_tokens": 300, "temperature": 1.0, "seed": seed}
    choice = client.chat.completions.create(**kw).choices[0]  # type: ignore[call-overload]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]  # type: ignore[union-attr]
    assert calls and not choice.message.content and (len(calls) == 1 or parallel)
    assert choice.finish_reason == "tool_calls" or (parallel and choice.finish_reason == "length")
    parsed = [(name, json.loads(args)) for name, args in calls]
    for name, args in parsed:
        if isinstance(tool_choice, dict):
            assert name == "get_weather" and set(args) == {"city"}
        else:
            assert (name, sorted(args)) in [("get_weather", ["city"]), ("get_time", ["tz"])]
    chunks = list(client.chat.completions.create(stream=True, **kw))  # type: ignore[call-overload]
    assert _streamed_calls(chunks) == calls
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    return parsed


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls(client: openai.OpenAI, tool_choice: object) -> None:
    """One call, streamed or not; then its result goes back as a tool turn."""
    ((name, args),) = _check_tool_calls(client, tool_choice, parallel=False)
    call = {"id": "call-1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    turn = [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call-1", "content": '{"result": 21}'}]
    r = client.chat.completions.create(model=TINY_MODEL, messages=turn, tools=TOOLS, max_tokens=4, **GREEDY)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason in ("stop", "length")


def test_parallel_tool_calls_stream_one_by_one(client: openai.OpenAI) -> None:
    """"required" with parallel_tool_calls: several calls (in some of a few sampled replies), each
    streamed as it completes."""
    assert any(len(_check_tool_calls(client, "required", parallel=True, seed=seed)) > 1 for seed in range(1, 20))


def test_llama3_json_tool_call_parser(module_tmp: Path) -> None:
    """--tool-call-parser llama3_json (with vLLM's --enable-auto-tool-choice, accepted): "required"
    and named choices constrain the reply to Llama's JSON calls, which come back as tool_calls,
    streamed or not; "auto" leaves plain text alone."""
    with pdserve_server(module_tmp, "--tool-call-parser", "llama3_json", "--enable-auto-tool-choice") as s:
        client = openai.OpenAI(base_url=s.v1_url, api_key="unused", max_retries=0)
        assert any(len(_check_tool_calls(client, "required", True, seed)) > 1 for seed in range(1, 20))
        _check_tool_calls(client, {"type": "function", "function": {"name": "get_weather"}}, parallel=False)
        r = client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": "Hello"}],
                                           tools=TOOLS, max_tokens=8, **GREEDY)  # type: ignore[arg-type]
        assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_tool_choice_auto_and_none_leave_text_alone(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=TINY_MODEL, messages=messages, tools=TOOLS, tool_choice=choice,  # type: ignore[arg-type]
                                           max_tokens=8, **GREEDY)
        assert r.choices[0].message.content and not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
      "tool_choice": "required"}, "tool_choice"),
])
def test_bad_tool_requests_are_400(server: ServerProcess, body: dict, param: str | None) -> None:
    r = httpx.post(server.v1_url + "/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert param is None or r.json()["error"]["param"] == param, r.text


def test_chat_template_kwargs(server: ServerProcess) -> None:
    """vLLM's chat_template_kwargs reach the template (the dummy's ChatML follows Qwen3: with
    enable_thinking false the reply starts after an empty think block); template variables of the
    server's own may not be overridden."""
    messages = [{"role": "user", "content": "hi"}]
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        plain = http.post("/tokenize", json={"messages": messages}).json()["count"]
        off = http.post("/tokenize", json={"messages": messages, "chat_template_kwargs": {"enable_thinking": False}})
        assert off.json()["count"] == plain + len("<think>\n\n</think>\n\n")
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2,
                                                   "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == plain + 19
        bad = http.post("/v1/chat/completions", json={"messages": messages, "chat_template_kwargs": {"messages": []}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


def test_reasoning_parser(module_tmp: Path) -> None:
    """--reasoning-parser qwen3: the <think> block goes to reasoning_content, streamed or not (a
    regex makes the random model write one); without the flag it stays in the content."""
    body = {"messages": [{"role": "user", "content": "Think first."}], "max_tokens": 60, "temperature": 1.0,
            "seed": 3, "guided_regex": "<think>\\n[a-z]{6}\\n</think>\\n\\n[a-z]{4}"}
    with pdserve_server(module_tmp, "--reasoning-parser", "qwen3") as s:
        c = openai.OpenAI(base_url=s.v1_url, api_key="unused", max_retries=0)
        r = httpx.post(s.v1_url + "/chat/completions", json=body, timeout=60).json()
        message = r["choices"][0]["message"]
        assert re.fullmatch("[a-z]{6}", message["reasoning_content"]) and re.fullmatch("[a-z]{4}", message["content"])
        chunks = list(c.chat.completions.create(model=TINY_MODEL, messages=body["messages"], max_tokens=60,  # type: ignore[arg-type]
                                                temperature=1.0, seed=3, stream=True,
                                                extra_body={"guided_regex": body["guided_regex"]}))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message["reasoning_content"]
        assert "".join(d.content or "" for d in deltas) == message["content"]
    with pdserve_server(module_tmp) as s:
        message = httpx.post(s.v1_url + "/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert message["content"].startswith("<think>\n") and "reasoning_content" not in message


def test_batch_of_prompts(client: openai.OpenAI) -> None:
    """Several prompts in one completions request (OpenAI's and vLLM's; lm-eval batches so): choice
    k*n+i is prompt k's i-th, equal to that prompt sent alone; usage counts each prompt once."""
    prompts = ["The quick brown fox", "Hello there", "A third prompt, longer than the others"]
    alone = [client.completions.create(model=TINY_MODEL, prompt=p, max_tokens=5, **GREEDY) for p in prompts]
    r = client.completions.create(model=TINY_MODEL, prompt=prompts, max_tokens=5, n=2, **GREEDY)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert r.usage is not None and r.usage.prompt_tokens == sum(len(p.encode()) for p in prompts)
    assert r.usage.completion_tokens == 6 * 5
    out = ["", "", ""]
    for chunk in client.completions.create(model=TINY_MODEL, prompt=prompts, max_tokens=5, stream=True, **GREEDY):
        for c in chunk.choices:
            out[c.index] += c.text
    assert out == [a.choices[0].text for a in alone]
    scored = client.completions.create(model=TINY_MODEL, prompt=prompts[:2], max_tokens=0, echo=True, logprobs=1)
    assert [c.text for c in scored.choices] == prompts[:2]
    assert [len(c.logprobs.token_logprobs or []) for c in scored.choices] == [len(p.encode()) for p in prompts[:2]]  # type: ignore[union-attr]
