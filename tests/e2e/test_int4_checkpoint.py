"""GPTQ / AWQ 4-bit checkpoints served by real `pdserve serve` processes: an AWQ checkpoint answers a
chat completion, and a prefill + decode pair on a GPTQ checkpoint (4-bit layers on both halves) gives
the standalone instance's greedy text."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from pdserve.model.export import export_model
from tests.e2e.conftest import pdserve_server
from tests.e2e.test_disagg_http import PROMPTS, blocks_back, complete, disagg


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int4")
    return {q: export_model("dummy:qwen3-tiny", root / q, quantization=q, group_size=32) for q in ("awq", "gptq")}


def test_serve_awq_answers_chat(module_tmp, exported):
    model = str(exported["awq"])
    with pdserve_server(module_tmp, model=model) as s:
        r = httpx.post(f"{s.v1_url}/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True,
        })
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8
        assert "awq checkpoint: 8 4-bit layers" in s.log()


@pytest.mark.parametrize("mode", ["read", "write"])
def test_disagg_gptq_equals_standalone(module_tmp, exported, mode):
    model = str(exported["gptq"])
    flags = ("--kv-mode", mode, "--max-num-batched-tokens", "32")
    with ExitStack() as st:
        s = st.enter_context(pdserve_server(module_tmp, "--max-num-batched-tokens", "32", model=model))
        p = st.enter_context(pdserve_server(module_tmp, "--role", "prefill", *flags, model=model))
        d = st.enter_context(pdserve_server(module_tmp, "--role", "decode", *flags, model=model))
        for prompt in PROMPTS[:3]:
            ref = complete(s.base_url, prompt, {"model": model})["choices"][0]
            got = disagg(p, d, prompt, mode, both={"model": model})["choices"][0]
            assert got["text"] == ref["text"] and got["finish_reason"] == "length"
        assert "gptq checkpoint: 8 4-bit layers" in p.log() and "gptq checkpoint: 8 4-bit layers" in d.log()
        blocks_back(s, p, d)
