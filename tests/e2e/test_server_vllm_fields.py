"""vLLM's request fields `return_token_ids`, `prompt_logprobs`, `priority` and `truncate_prompt_tokens`
with the official `openai` client (extra_body in, model_extra out) against real `pdserve serve` processes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import TINY_MODEL, ServerProcess, pdserve_server

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": PROMPT}]
# Whole characters only (no byte token of a longer UTF-8 character): the ids detokenize to exactly the text.
ASCII = {"temperature": 0.0, "seed": 5, "extra_body": {"structured_outputs": {"regex": "[a-z ]{10}"},
                                                       "return_token_ids": True}}


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(module_tmp) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def _extra(obj: object) -> dict:
    extra = getattr(obj, "model_extra", None)
    assert extra is not None
    return extra


def test_completion_return_token_ids(client: openai.OpenAI, http: httpx.Client) -> None:
    full = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=10, **ASCII)  # type: ignore[arg-type]
    choice = _extra(full.choices[0])
    assert "prompt_token_ids" not in _extra(full)  # completions: on the choice, as vLLM
    prompt_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert choice["prompt_token_ids"] == prompt_ids
    ids = choice["token_ids"]
    assert full.usage is not None and len(ids) == full.usage.completion_tokens > 0
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == full.choices[0].text

    chunks = [c for c in client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=10, stream=True,
                                                   **ASCII) if c.choices]  # type: ignore[arg-type]
    extras = [_extra(c.choices[0]) for c in chunks]
    assert extras[0]["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in e for e in extras[1:])
    assert [t for e in extras for t in e["token_ids"]] == ids
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text

    plain = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=3)
    assert "token_ids" not in _extra(plain.choices[0]) and "prompt_token_ids" not in _extra(plain.choices[0])


def test_completion_return_token_ids_with_n_and_batches(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.completions.create(model=TINY_MODEL, prompt=[PROMPT, "Hi"], max_tokens=4, n=2, temperature=1.0,
                                  seed=3, extra_body={"return_token_ids": True, "ignore_eos": True})
    assert len(r.choices) == 4
    for c in r.choices:
        e = _extra(c)
        assert e["prompt_token_ids"] == http.post("/tokenize", json={"prompt": PROMPT if c.index < 2 else "Hi"}
                                                  ).json()["tokens"]
        assert len(e["token_ids"]) == 4
    scored = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0,
                                       extra_body={"return_token_ids": True})
    assert _extra(scored.choices[0])["token_ids"] == []  # max_tokens 0: nothing generated is shown


def test_chat_return_token_ids(client: openai.OpenAI, http: httpx.Client) -> None:
    full = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=10, **ASCII)  # type: ignore[arg-type]
    prompt_ids = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert _extra(full)["prompt_token_ids"] == prompt_ids  # chat: top level, as vLLM
    ids = _extra(full.choices[0])["token_ids"]
    assert full.usage is not None and len(ids) == full.usage.completion_tokens > 0
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == full.choices[0].message.content

    chunks = list(client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=10, stream=True,
                                                 **ASCII))  # type: ignore[arg-type]
    assert _extra(chunks[0])["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in _extra(c) for c in chunks[1:])
    streamed = [t for c in chunks for ch in c.choices for t in (_extra(ch).get("token_ids") or [])]
    assert streamed == ids
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == full.choices[0].message.content


def _check_prompt_logprobs(plps: list, prompt_ids: list[int], k: int, http: httpx.Client) -> None:
    assert len(plps) == len(prompt_ids) and plps[0] is None
    for token, entry in zip(prompt_ids[1:], plps[1:], strict=True):
        assert str(token) in entry and len(entry) in (k, k + 1)
        for value in entry.values():
            assert value["logprob"] <= 0.0 and value["rank"] >= 1 and isinstance(value["decoded_token"], str)
        top = sorted((v for t, v in entry.items() if t != str(token) or v["rank"] <= k), key=lambda v: v["rank"])
        assert [v["rank"] for v in top][:k] == list(range(1, k + 1))
        assert entry[str(token)]["decoded_token"] == http.post("/detokenize", json={"tokens": [token]}).json()["prompt"]


def test_prompt_logprobs(client: openai.OpenAI, http: httpx.Client) -> None:
    prompt_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    r = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=2, temperature=0.0,
                                  extra_body={"prompt_logprobs": 2})
    plps = _extra(r.choices[0])["prompt_logprobs"]
    _check_prompt_logprobs(plps, prompt_ids, 2, http)
    # The same values as echo's logprobs of the prompt (one k serves both when both are asked).
    echo = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                     extra_body={"prompt_logprobs": 3})
    lp = echo.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    mine = [entry[str(t)]["logprob"] for t, entry in zip(prompt_ids[1:], plps[1:], strict=True)]
    assert lp.token_logprobs[1:] == pytest.approx(mine, abs=1e-5)
    assert all(top is None or len(top) <= 2 for top in lp.top_logprobs)  # echo keeps its own k
    _check_prompt_logprobs(_extra(echo.choices[0])["prompt_logprobs"], prompt_ids, 3, http)

    chat = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=2,  # type: ignore[arg-type]
                                          extra_body={"prompt_logprobs": 0})
    chat_ids = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    _check_prompt_logprobs(_extra(chat)["prompt_logprobs"], chat_ids, 0, http)
    assert "prompt_logprobs" not in _extra(client.completions.create(model=TINY_MODEL, prompt=PROMPT,
                                                                      max_tokens=1).choices[0])


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "priority": 1}, "priority"),  # this instance schedules fcfs
    ("/v1/chat/completions", {"messages": MESSAGES, "priority": -1}, "priority"),
    ("/v1/completions", {"prompt": PROMPT, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    # max_model_len 4096 less max_tokens 2 leaves room for 4094 prompt tokens (vLLM's check).
    ("/v1/completions", {"prompt": PROMPT, "truncate_prompt_tokens": 4095}, "truncate_prompt_tokens"),
    # What a beam search cannot honour (server/beam_serving.py).
    ("/v1/completions", {"prompt": PROMPT, "use_beam_search": True, "n": 11}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "use_beam_search": True, "stop": ["fox"]}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "use_beam_search": True, "echo": True, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "use_beam_search": True, "response_format": {
        "type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "use_beam_search": True, "repetition_penalty": 1.2},
     "repetition_penalty"),
])
def test_refused(http: httpx.Client, path: str, body: dict, param: str) -> None:
    r = http.post(path, json={"model": TINY_MODEL, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = {k: v for k, v in body.items() if k != param}
    assert http.post(path, json={"model": TINY_MODEL, "max_tokens": 2, **ok}).status_code == 200


def test_truncate_prompt_tokens(client: openai.OpenAI, http: httpx.Client) -> None:
    """vLLM's truncate_prompt_tokens: each prompt keeps its last k tokens (chat: of the rendered
    template), which usage counts, the returned prompt ids and echo show, and the output follows
    (greedy: as for those k token ids sent as the prompt)."""
    k = 6
    kw = {"model": TINY_MODEL, "max_tokens": 4, "temperature": 0.0}
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    cut = client.completions.create(prompt=PROMPT, **kw, extra_body={  # type: ignore[call-overload]
        "truncate_prompt_tokens": k, "return_token_ids": True, "ignore_eos": True})
    want = client.completions.create(prompt=ids[-k:], **kw, extra_body={  # type: ignore[call-overload]
        "return_token_ids": True, "ignore_eos": True})
    assert cut.usage is not None and cut.usage.prompt_tokens == k
    assert _extra(cut.choices[0])["prompt_token_ids"] == ids[-k:]
    assert _extra(cut.choices[0])["token_ids"] == _extra(want.choices[0])["token_ids"]
    assert cut.choices[0].text == want.choices[0].text

    # Token ids, and a batch: every prompt cut; echo shows what the model saw.
    batch = client.completions.create(prompt=[ids, ids[1:]], echo=True, **kw,  # type: ignore[call-overload]
                                      extra_body={"truncate_prompt_tokens": k, "ignore_eos": True})
    texts = client.completions.create(prompt=[PROMPT, PROMPT], echo=True, **kw,  # type: ignore[call-overload]
                                      extra_body={"truncate_prompt_tokens": k, "ignore_eos": True})
    tail = http.post("/detokenize", json={"tokens": ids[-k:]}).json()["prompt"]
    assert batch.usage is not None and texts.usage is not None and batch.usage.prompt_tokens == 2 * k
    assert [c.text for c in batch.choices + texts.choices] == [tail + want.choices[0].text] * 4

    chat_ids = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    chat = client.chat.completions.create(messages=MESSAGES, **kw, extra_body={  # type: ignore[call-overload]
        "truncate_prompt_tokens": k, "return_token_ids": True, "ignore_eos": True})
    same = client.completions.create(prompt=chat_ids[-k:], **kw, extra_body={  # type: ignore[call-overload]
        "return_token_ids": True, "ignore_eos": True})
    assert chat.usage is not None and chat.usage.prompt_tokens == k
    assert _extra(chat)["prompt_token_ids"] == chat_ids[-k:]
    assert _extra(chat.choices[0])["token_ids"] == _extra(same.choices[0])["token_ids"]


def test_high_priority_request_finishes_before_the_queue(module_tmp: Path) -> None:
    """One sequence at a time: a high-priority request sent behind a queue of low-priority ones is
    served as soon as the running one ends, before the queue (order, not timing: the running one is
    long enough for everything else to be queued meanwhile)."""
    with pdserve_server(module_tmp, "--scheduling-policy", "priority", "--max-num-seqs", "1") as server:
        client = openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0, timeout=120)
        finished: list[str] = []
        lock = threading.Lock()

        def send(name: str, priority: int, max_tokens: int) -> threading.Thread:
            def go() -> None:
                client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=max_tokens,
                                          extra_body={"priority": priority, "ignore_eos": True})
                with lock:
                    finished.append(name)

            thread = threading.Thread(target=go)
            thread.start()
            return thread

        threads = [send("running", 5, 600)]
        server.wait_metrics({"pdserve_num_requests_running": 1}, timeout=60)
        threads += [send(f"low{i}", 5, 8) for i in range(3)]
        server.wait_metrics({"pdserve_num_requests_running": 1, "pdserve_num_requests_waiting": 3}, timeout=60)
        threads.append(send("high", 0, 8))
        for t in threads:
            t.join(120)
        # The lows arrive in any order (threads); fcfs would serve high last.
        assert finished[:2] == ["running", "high"] and sorted(finished[2:]) == ["low0", "low1", "low2"], finished


# -- vLLM's beam search (use_beam_search: n beams) ------------------------------------------------
BEAMS = {"temperature": 0.0, "extra_body": {"use_beam_search": True, "ignore_eos": True, "return_token_ids": True}}


def _summed(choice: object) -> float:
    logprobs = getattr(choice, "logprobs", None)
    assert logprobs is not None and logprobs.token_logprobs
    return sum(logprobs.token_logprobs)


def test_beam_search_completions(server: ServerProcess, client: openai.OpenAI) -> None:
    """n = 3 beams: three distinct sequences, best first (one length: by cumulative logprob), the
    best at least as likely as greedy decoding's; width 1 is greedy; streamed, the same choices
    whole; usage counts every beam's tokens; every block free afterwards."""
    kw = {"model": TINY_MODEL, "prompt": PROMPT, "max_tokens": 6, "logprobs": 1, **BEAMS}
    r = client.completions.create(n=3, **kw)  # type: ignore[call-overload]
    assert [c.index for c in r.choices] == [0, 1, 2]
    ids = [_extra(c)["token_ids"] for c in r.choices]
    assert len({tuple(i) for i in ids}) == 3 and all(len(i) == 6 for i in ids)
    summed = [_summed(c) for c in r.choices]
    assert summed == sorted(summed, reverse=True)
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 18
    greedy = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=6, logprobs=0, temperature=0.0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    assert summed[0] >= _summed(greedy.choices[0]) - 1e-4
    one = client.completions.create(n=1, **kw)  # type: ignore[call-overload]
    assert _extra(one.choices[0])["token_ids"] == _extra(greedy.choices[0])["token_ids"]

    streamed: dict[int, list[int]] = {}
    usage = None
    for chunk in client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):  # type: ignore[call-overload]
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(_extra(c)["token_ids"])
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(3)] == ids and usage is not None and usage.completion_tokens == 18
    total = server.metrics()["pdserve_kv_blocks_total"]
    server.wait_metrics({"pdserve_kv_blocks_free": total, "pdserve_num_requests_in_flight": 0})


def test_beam_search_chat_and_length_penalty(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=5, n=2,  # type: ignore[arg-type]
                                       logprobs=True, top_logprobs=2, **BEAMS)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.logprobs is not None and c.logprobs.content is not None
        assert len(c.logprobs.content) == len(_extra(c)["token_ids"]) == 5
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert r.usage is not None and r.usage.completion_tokens == 10
    # Without ignore_eos, beams may end at EOS (finish "stop", the EOS neither in the text nor the ids).
    kw = {"model": TINY_MODEL, "prompt": PROMPT, "max_tokens": 4, "n": 4, "temperature": 0.0}
    for penalty in (0.0, 2.0):
        out = client.completions.create(**kw, extra_body={"use_beam_search": True, "length_penalty": penalty})  # type: ignore[call-overload]
        assert len(out.choices) == 4 and all(c.finish_reason in ("stop", "length") for c in out.choices)


def test_beam_search_client_gone_aborts_every_beam(server: ServerProcess) -> None:
    """A client that leaves mid-search (unstreamed or streamed): the beams in flight are aborted,
    the request ends "abort", every block is free."""
    body = {"model": TINY_MODEL, "prompt": PROMPT, "max_tokens": 400, "n": 4, "use_beam_search": True,
            "ignore_eos": True, "temperature": 0.0}
    before = server.metrics().get('pdserve_requests_total{finish_reason="abort"}', 0.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=1.0)
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200  # headers only: the choices come when the search ends; leave now
    total = server.metrics()["pdserve_kv_blocks_total"]
    server.wait_metrics({"pdserve_kv_blocks_free": total, "pdserve_num_requests_in_flight": 0,
                         'pdserve_requests_total{finish_reason="abort"}': before + 2}, timeout=30)


# ---- vLLM's include_stop_str_in_output, allowed_token_ids, bad_words, return_tokens_as_token_ids,
# cache_salt, and its /version and /ping routes ----------------------------------------------------
def _ascii_reply(client: openai.OpenAI, chat: bool, stream: bool, **extra: object) -> str:
    """A greedy 10-letter ASCII reply (ASCII's regex), streamed or not."""
    body = {**ASCII["extra_body"], **extra}  # type: ignore[dict-item]
    kw = {"model": TINY_MODEL, "max_tokens": 10, "temperature": 0.0, "stream": stream, "extra_body": body}
    if chat:
        r = client.chat.completions.create(messages=MESSAGES, **kw)  # type: ignore[call-overload]
        if not stream:
            return r.choices[0].message.content
        return "".join(ch.delta.content or "" for c in r for ch in c.choices)
    r = client.completions.create(prompt=PROMPT, **kw)  # type: ignore[call-overload]
    return "".join(ch.text for c in r for ch in c.choices) if stream else r.choices[0].text


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_include_stop_str_in_output(client: openai.OpenAI, chat: bool) -> None:
    free = _ascii_reply(client, chat, False)
    stop = free[4:6]
    end = free.index(stop) + len(stop)
    for stream in (False, True):
        assert _ascii_reply(client, chat, stream, stop=[stop], include_stop_str_in_output=True) == free[:end]
        assert _ascii_reply(client, chat, stream, stop=[stop]) == free[: end - len(stop)]


def _reply_and_ids(client: openai.OpenAI, chat: bool, stream: bool, **extra: object) -> tuple[str, list[int]]:
    """A greedy ASCII reply (ASCII's regex) and its token ids, streamed or not."""
    body = {**ASCII["extra_body"], **extra}  # type: ignore[dict-item]
    kw = {"model": TINY_MODEL, "max_tokens": 10, "temperature": 0.0, "stream": stream, "extra_body": body}
    if chat:
        r = client.chat.completions.create(messages=MESSAGES, **kw)  # type: ignore[call-overload]
        choices = [ch for c in r for ch in c.choices] if stream else r.choices
        text = "".join((ch.delta.content if stream else ch.message.content) or "" for ch in choices)
    else:
        r = client.completions.create(prompt=PROMPT, **kw)  # type: ignore[call-overload]
        choices = [ch for c in r for ch in c.choices] if stream else r.choices
        text = "".join(ch.text for ch in choices)
    return text, [t for ch in choices for t in _extra(ch).get("token_ids") or []]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stop_token_text_is_left_out_unless_include_stop_str_in_output(
    client: openai.OpenAI, http: httpx.Client, chat: bool
) -> None:
    """vLLM v1: a stop_token_ids token (here an ordinary word) or an EOS that ends the output
    stays in token_ids, its text only with include_stop_str_in_output; streamed or not."""
    _, ids = _reply_and_ids(client, chat, False)
    stop = ids[len(ids) // 2]
    j = ids.index(stop)  # its first occurrence ends the output

    def text(upto: int) -> str:
        return http.post("/detokenize", json={"tokens": ids[:upto]}).json()["prompt"]

    assert text(j) != text(j + 1)
    for stream in (False, True):
        assert _reply_and_ids(client, chat, stream, stop_token_ids=[stop]) == (text(j), ids[: j + 1])
        assert _reply_and_ids(client, chat, stream, stop_token_ids=[stop], include_stop_str_in_output=True) \
            == (text(j + 1), ids[: j + 1])
        # An EOS (<|im_end|>, 258 in the byte tokenizer) shown as text with skip_special_tokens false.
        eos = {"structured_outputs": None, "allowed_token_ids": [258], "skip_special_tokens": False}
        assert _reply_and_ids(client, chat, stream, **eos) == ("", [258])
        assert _reply_and_ids(client, chat, stream, **eos, include_stop_str_in_output=True) == ("<|im_end|>", [258])


def test_beam_search_with_allowed_token_ids(client: openai.OpenAI, http: httpx.Client) -> None:
    """Every beam holds only allowed tokens (completions and chat, streamed or not), distinct beams,
    best first; an id outside the vocabulary is a 400 naming the field."""
    abc = http.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    extra = {**BEAMS["extra_body"], "allowed_token_ids": abc}  # type: ignore[dict-item]
    kw = {"model": TINY_MODEL, "max_tokens": 6, "n": 3, "temperature": 0.0, "logprobs": 1, "extra_body": extra}
    r = client.completions.create(prompt=PROMPT, **kw)  # type: ignore[call-overload]
    ids = [_extra(c)["token_ids"] for c in r.choices]
    assert len({tuple(i) for i in ids}) == 3 and all(len(i) == 6 and set(i) <= set(abc) for i in ids)
    assert all(set(c.text) <= set("abc") for c in r.choices)
    summed = [_summed(c) for c in r.choices]
    assert summed == sorted(summed, reverse=True)
    streamed: dict[int, list[int]] = {}
    for chunk in client.completions.create(prompt=PROMPT, stream=True, **kw):  # type: ignore[call-overload]
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(_extra(c)["token_ids"])
    assert [streamed[i] for i in range(3)] == ids
    chat = client.chat.completions.create(messages=MESSAGES, **{**kw, "logprobs": True})  # type: ignore[call-overload]
    assert len(chat.choices) == 3
    assert all(set(_extra(c)["token_ids"]) <= set(abc) and set(c.message.content) <= set("abc") for c in chat.choices)
    test_refused(http, "/v1/completions", {"prompt": PROMPT, "use_beam_search": True, "allowed_token_ids": [5, 512]},
                 "allowed_token_ids")


def test_allowed_token_ids_and_bad_words(client: openai.OpenAI, http: httpx.Client) -> None:
    abc = http.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    kw = {"model": TINY_MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 3}
    r = client.completions.create(**kw, extra_body={  # type: ignore[call-overload]
        "allowed_token_ids": abc, "return_token_ids": True, "ignore_eos": True})
    assert set(_extra(r.choices[0])["token_ids"]) <= set(abc) and set(r.choices[0].text) <= set("abc")
    # "b" never; "ca" (two tokens): never "a" after "c", so the text is some a's, then c's.
    body = {"allowed_token_ids": abc, "bad_words": ["b", "ca"], "ignore_eos": True}
    for seed in range(3):
        text = client.completions.create(**{**kw, "seed": seed}, extra_body=body).choices[0].text  # type: ignore[call-overload]
        assert len(text) == 12 and text == "a" * text.count("a") + "c" * text.count("c")
        stream = client.completions.create(**{**kw, "seed": seed}, extra_body=body, stream=True)  # type: ignore[call-overload]
        assert "".join(ch.text for c in stream for ch in c.choices) == text


def test_return_tokens_as_token_ids(client: openai.OpenAI) -> None:
    r = client.completions.create(model=TINY_MODEL, prompt=PROMPT, max_tokens=4, logprobs=2, extra_body={
        "return_tokens_as_token_ids": True, "return_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert lp.tokens == [f"token_id:{t}" for t in _extra(r.choices[0])["token_ids"]]
    assert all(key.startswith("token_id:") for top in lp.top_logprobs for key in top)

    kw = {"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
          "temperature": 0.0, "extra_body": {"return_tokens_as_token_ids": True, "return_token_ids": True}}
    chat = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [f"token_id:{t}" for t in _extra(chat.choices[0])["token_ids"]]
    assert all(c.bytes == list(c.token.encode()) for c in content)
    assert all(t.token.startswith("token_id:") for c in content for t in c.top_logprobs)
    stream = client.chat.completions.create(**kw, stream=True)  # type: ignore[call-overload]
    tokens = [i.token for c in stream for ch in c.choices if ch.logprobs for i in ch.logprobs.content or []]
    assert tokens == [c.token for c in content]


def test_cache_salt_shares_cached_tokens_only_within_a_salt(client: openai.OpenAI) -> None:
    prompt = "A prompt kept apart by its cache salt, long enough for several KV blocks. " * 2

    def cached(salt: str | None) -> int:
        extra = {} if salt is None else {"cache_salt": salt}
        r = client.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=1, extra_body=extra)
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return r.usage.prompt_tokens_details.cached_tokens or 0

    got = [cached(s) for s in ("a", "a", "b", None, None, "a")]
    assert got[0] == got[2] == got[3] == 0 and got[1] == got[4] == got[5] > 0


def test_responses_take_the_cache_salt(client: openai.OpenAI) -> None:
    """/v1/responses passes `cache_salt` on as chat does: a salted response shares cached blocks only
    with its own salt."""
    text = "A responses input kept apart by its cache salt, long enough for several KV blocks. " * 2

    def cached(salt: str) -> int:
        r = client.responses.create(model=TINY_MODEL, input=text, max_output_tokens=1, store=False,
                                    extra_body={"cache_salt": salt})
        assert r.usage is not None
        return r.usage.input_tokens_details.cached_tokens

    got = [cached(s) for s in ("r1", "r1", "r2")]
    assert got[0] == got[2] == 0 < got[1]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": PROMPT, "allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/chat/completions", {"messages": MESSAGES, "allowed_token_ids": [5, 512]}, "allowed_token_ids"),
    ("/v1/completions", {"prompt": PROMPT, "bad_words": ["ok", " \n"]}, "bad_words"),
    ("/v1/chat/completions", {"messages": MESSAGES, "cache_salt": ""}, "cache_salt"),
])
def test_extras_refused(http: httpx.Client, path: str, body: dict, param: str) -> None:
    test_refused(http, path, body, param)


def test_version_and_ping(http: httpx.Client) -> None:
    from pdserve import __version__

    assert http.get("/version").json() == {"version": __version__}
    for method in ("GET", "POST"):  # SageMaker's health check, as vLLM's
        assert http.request(method, "/ping").status_code == 200
