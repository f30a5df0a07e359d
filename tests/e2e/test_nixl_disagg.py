"""`pdserve up disagg --kv-transport nixl`: a real prefill + decode pair moving KV with NIXL (UCX on
loopback / shared memory) behind the proxy, READ and WRITE; outputs equal a standalone instance's,
KV bytes moved, every block back, and NIXL's own logging kept out of the instances' output."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pdserve.launch import launch_topology, parse_topology
from tests.e2e.conftest import TINY_MODEL, ServerProcess, parse_metrics, pdserve_server

if importlib.util.find_spec("nixl_cu12") is None and importlib.util.find_spec("nixl") is None:
    pytest.skip("NIXL is not installed (pip install 'pdserve[nixl]')", allow_module_level=True)

ENGINE_ARGS = ("--num-kv-blocks", "128", "--max-model-len", "512", "--threads", "1")
GREEDY = {"temperature": 0.0, "max_tokens": 10}
PROMPTS = ["Hello there", "A longer prompt that spans several KV blocks of sixteen tokens: " + "abc " * 40]


@pytest.fixture(scope="module")
def reference(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(module_tmp, "--max-model-len", "512") as s:
        yield s


def _outputs(base_url: str) -> list[str]:
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    out = []
    for prompt in PROMPTS:
        out.append(c.completions.create(model=TINY_MODEL, prompt=prompt, **GREEDY).choices[0].text)
        stream = c.completions.create(model=TINY_MODEL, prompt=prompt, stream=True, **GREEDY)
        out.append("".join(ch.choices[0].text for ch in stream if ch.choices))
        chat = c.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": prompt}], **GREEDY)
        out.append(chat.choices[0].message.content or "")
    return out


def _metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text)


@pytest.mark.parametrize("mode", ["read", "write"])
def test_disagg_over_nixl_equals_standalone(mode: str, reference: ServerProcess, tmp_path: Path) -> None:
    spec = parse_topology(f"disagg-{mode}", TINY_MODEL, run_dir=str(tmp_path), engine_args=ENGINE_ARGS,
                          kv_transport="nixl", startup_timeout_s=120)
    want = _outputs(reference.base_url)
    with launch_topology(spec) as topo:
        prefill, decode = topo.instances
        assert "--kv-transport" in prefill.argv and "nixl" in prefill.argv
        assert _outputs(topo.url) == want and all(want)
        mover = decode if mode == "read" else prefill
        assert _metrics(mover.url)["pdserve_kv_bytes_transferred_total"] > 0
        deadline = time.monotonic() + 15  # every block back (no lease had to expire: that is 30 s)
        for inst in topo.instances:
            while (m := _metrics(inst.url))["pdserve_kv_blocks_free"] != m["pdserve_kv_blocks_total"]:
                assert time.monotonic() < deadline, f"{inst.name} holds blocks: {m['pdserve_kv_blocks_free']}"
                time.sleep(0.1)
    for inst in topo.instances:
        log = inst.log_path.read_text(errors="replace")
        assert "NIXL agent" in log  # pdserve's own line: the agent was made, the cache registered
        assert "NIXL INFO" not in log  # nixl's INFO chatter on stdout is routed to our logging
