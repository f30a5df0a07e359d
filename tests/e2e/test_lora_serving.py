"""LoRA adapters through real `pdserve serve` processes: `model` names an adapter (the official
`openai` client), adapters load and unload at runtime, and a disaggregated request with an adapter
(prefill and decode both serving it, read and write mode) equals the standalone one."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest

from pdserve import LLM, LoRARequest, SamplingParams
from tests.e2e.conftest import ServerProcess, free_port, launch, pdserve_argv, pdserve_server
from tests.e2e.test_disagg_http import disagg
from tests.lora_models import make_base_and_adapters

pytest.importorskip("peft")

PROMPT = [(7 * j + 3) % 300 for j in range(37)]
N = 8


@pytest.fixture(scope="module")
def models(module_tmp: Path) -> Path:
    make_base_and_adapters(module_tmp)
    return module_tmp


@pytest.fixture(scope="module")
def expected(models: Path) -> dict[str | None, str]:
    """Greedy text per adapter from the offline engine (itself checked against PEFT in unit tests)."""
    llm = LLM(str(models / "base"), dtype="float32", num_kv_blocks=64, enable_lora=True)
    sp = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    out = {w: llm.generate([PROMPT], sp, lora_request=LoRARequest(w, i, str(models / w)) if w else None)[0]
           for i, w in enumerate((None, "a", "b"))}
    llm.close()
    return {w: o.outputs[0].text for w, o in out.items()}


def _flags(models: Path) -> tuple[str, ...]:
    return ("--dtype", "float32", "--enable-lora", "--lora-modules", f"a={models / 'a'}")


@pytest.fixture(scope="module")
def server(models: Path, module_tmp: Path):
    with pdserve_server(module_tmp, *_flags(models), model=str(models / "base")) as s:
        yield s


def _text(server: ServerProcess, model: str) -> str:
    client = openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0,
                                    extra_body={"ignore_eos": True})
    return out.choices[0].text


def test_model_names_an_adapter(server: ServerProcess, models: Path, expected) -> None:
    cards = {m["id"]: m for m in httpx.get(f"{server.v1_url}/models").json()["data"]}
    assert cards["a"]["parent"] == str(models / "base") and cards["a"]["root"] == str(models / "a")
    assert _text(server, "a") == expected["a"]
    assert _text(server, str(models / "base")) == expected[None]
    assert expected["a"] != expected[None]


def test_load_and_unload_at_runtime(server: ServerProcess, models: Path, expected) -> None:
    url = server.v1_url
    r = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "b", "lora_path": str(models / "b")})
    assert r.status_code == 200 and "added" in r.text
    assert _text(server, "b") == expected["b"]
    taken = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "b", "lora_path": str(models / "b")})
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "lora_name"
    bad = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "c", "lora_path": str(models / "nope")})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
    gone = httpx.post(f"{url}/completions", json={"model": "b", "prompt": PROMPT, "max_tokens": 1})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "b"}).status_code == 404
    assert "b" not in {m["id"] for m in httpx.get(f"{url}/models").json()["data"]}


@pytest.mark.parametrize("mode", ["read", "write"])
def test_disaggregated_request_with_an_adapter(models: Path, module_tmp: Path, expected, mode: str) -> None:
    kv = ("--kv-mode", mode)
    with ExitStack() as st:
        p = st.enter_context(pdserve_server(module_tmp, "--role", "prefill", *kv, *_flags(models),
                                            model=str(models / "base")))
        d = st.enter_context(pdserve_server(module_tmp, "--role", "decode", *kv, *_flags(models),
                                            model=str(models / "base")))
        out = disagg(p, d, PROMPT, mode, both={"model": "a"}, max_tokens=N)
        assert out["choices"][0]["text"] == expected["a"]


def test_proxy_loads_the_adapter_on_both_halves(models: Path, module_tmp: Path, expected) -> None:
    base = str(models / "base")
    flags = ("--dtype", "float32", "--enable-lora", "--kv-mode", "write")
    with ExitStack() as st:
        p = st.enter_context(pdserve_server(module_tmp, "--role", "prefill", *flags, model=base))
        d = st.enter_context(pdserve_server(module_tmp, "--role", "decode", *flags, model=base))
        port = free_port()
        argv = pdserve_argv("proxy", "--port", str(port), "--no-registry", "--mode", "disagg", "--kv-mode", "write",
                            "--prefill", p.base_url, "--decode", d.base_url)
        proxy = st.enter_context(launch(argv, port, module_tmp / f"proxy-{port}.log"))
        r = httpx.post(f"{proxy.v1_url}/load_lora_adapter", json={"lora_name": "b", "lora_path": str(models / "b")})
        assert r.status_code == 200 and len(r.json()["instances"]) == 2, r.text
        client = openai.OpenAI(base_url=proxy.v1_url, api_key="unused", max_retries=0)
        out = client.completions.create(model="b", prompt=PROMPT, max_tokens=N, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected["b"]
        assert sum(s.metrics()["pdserve_kv_bytes_transferred_total"] for s in (p, d)) > 0  # disaggregated
        bad = httpx.post(f"{proxy.v1_url}/load_lora_adapter", json={"lora_name": "c", "lora_path": "/nope"})
        assert bad.status_code == 400 and all("error" in row for row in bad.json()["instances"])
        assert httpx.post(f"{proxy.v1_url}/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
