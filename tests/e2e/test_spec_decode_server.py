"""`pdserve serve --speculative-config` through the `openai` client: the same replies as a server
without speculation (greedy), streamed or not, constrained (response_format, tool_choice) or not,
and vLLM's spec_decode counters on /metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e import prom_text
from tests.e2e.conftest import TINY_MODEL, ServerProcess, pdserve_server

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
PROMPTS = ["the cat sat on the mat; the cat sat on the mat; the cat sat on", "Zq8#kLp0 vR@2"]
GREEDY = {"temperature": 0.0, "max_tokens": 48, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def servers(module_tmp: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    common = ("--dtype", "float32")
    with pdserve_server(module_tmp, *common) as plain, \
            pdserve_server(module_tmp, *common, "--speculative-config", json.dumps(SPEC)) as spec:
        yield plain, spec


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)


def test_replies_equal_a_server_without_speculation(servers: tuple[ServerProcess, ServerProcess]) -> None:
    plain, spec = servers
    for prompt in PROMPTS:
        want = client(plain).completions.create(model=TINY_MODEL, prompt=prompt, logprobs=2, **GREEDY)
        got = client(spec).completions.create(model=TINY_MODEL, prompt=prompt, logprobs=2, **GREEDY)
        assert got.choices[0].text == want.choices[0].text and got.usage == want.usage
        assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
        lps, want_lps = got.choices[0].logprobs.token_logprobs, want.choices[0].logprobs.token_logprobs
        assert lps == pytest.approx(want_lps, abs=1e-4)
        stream = client(spec).completions.create(model=TINY_MODEL, prompt=prompt, stream=True, **GREEDY)
        chunks = [c.choices[0] for c in stream if c.choices]
        assert "".join(c.text for c in chunks) == want.choices[0].text
        assert chunks[-1].finish_reason == "length"
        messages = [{"role": "user", "content": prompt}]
        chat = [client(s).chat.completions.create(model=TINY_MODEL, messages=messages, **GREEDY) for s in servers]
        assert chat[0].choices[0].message.content == chat[1].choices[0].message.content
    metrics = spec.metrics()
    drafts = metrics["pdserve_spec_decode_num_draft_tokens_total"]
    assert metrics["pdserve_spec_decode_num_drafts_total"] > 0 and drafts > 0
    assert 0 < metrics["pdserve_spec_decode_num_accepted_tokens_total"] <= drafts
    assert "pdserve_spec_decode_num_drafts_total" not in plain.metrics()
    # vLLM's names for the same counters, and its per-position count (position i: drafts whose i-th
    # token was accepted; each accepted token is counted at one position).
    vllm = prom_text.parse(httpx.get(f"{spec.base_url}/metrics", timeout=10).text)
    labels = {"model_name": TINY_MODEL, "engine": "0"}
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        got = prom_text.value(vllm, f"vllm:spec_decode_{name}_total", **labels)
        assert got == metrics[f"pdserve_spec_decode_{name}_total"], name
    per_pos = [prom_text.value(vllm, "vllm:spec_decode_num_accepted_tokens_per_pos_total", **labels, position=str(i))
               for i in range(SPEC["num_speculative_tokens"])]
    assert sum(per_pos) == metrics["pdserve_spec_decode_num_accepted_tokens_total"]
    assert per_pos == sorted(per_pos, reverse=True) and per_pos[0] <= metrics["pdserve_spec_decode_num_drafts_total"]
    assert "vllm:spec_decode_num_drafts_total" not in prom_text.parse(httpx.get(f"{plain.base_url}/metrics").text)


def test_constrained_replies_speculate_and_equal_a_server_without_speculation(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    """response_format json_schema (an array whose items repeat) and tool_choice "required": drafts
    are accepted under the grammar, and the replies are those of a server without speculation."""
    plain, spec = servers
    schema = {"type": "array", "items": {"enum": ["ab", "cd", "xyz"]}, "minItems": 12, "maxItems": 12}
    fmt = {"type": "json_schema", "json_schema": {"name": "list", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": PROMPTS[0]}]
    greedy = {"temperature": 0.0, "max_tokens": 200}
    accepted = spec.metrics()["pdserve_spec_decode_num_accepted_tokens_total"]
    replies = [client(s).chat.completions.create(model=TINY_MODEL, messages=messages, response_format=fmt,  # type: ignore[arg-type]
                                                 **greedy) for s in servers]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    content = replies[1].choices[0].message.content or ""
    assert replies[1].choices[0].finish_reason == "stop" and len(json.loads(content)) == 12
    assert replies[0].usage == replies[1].usage
    accepted, before = spec.metrics()["pdserve_spec_decode_num_accepted_tokens_total"], accepted
    assert accepted > before
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "required": ["items"], "additionalProperties": False,
        "properties": {"items": schema}}}}]
    calls = [client(s).chat.completions.create(model=TINY_MODEL, messages=messages, tools=tools,  # type: ignore[arg-type]
                                               tool_choice="required", parallel_tool_calls=False, **greedy)
             for s in servers]
    assert calls[1].choices[0].finish_reason == "tool_calls", calls[1].choices[0].message
    functions = [[t.function for t in c.choices[0].message.tool_calls or []] for c in calls]  # type: ignore[union-attr]
    assert functions[0] == functions[1] and functions[1][0].name == "pick" and calls[0].usage == calls[1].usage
    assert spec.metrics()["pdserve_spec_decode_num_accepted_tokens_total"] > accepted
