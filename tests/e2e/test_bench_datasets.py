"""`pdserve bench` on a ShareGPT file through /v1/chat/completions against a real `pdserve serve`:
the server's /tokenize counts the conversations, every sampled request completes with exactly the
reply's token count (--ignore-eos), and the JSON says what was run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from tests.e2e.conftest import REPO_ROOT, pdserve_argv, pdserve_server

REPLIES = ("Sure, here it is.", "No.", "Paris is the capital of France.", "Four", "A longer answer, in two parts.")


def test_sharegpt_chat_bench_against_a_real_server(tmp_path: Path) -> None:
    conversations: list[object] = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"Question {i}: what is the answer?"},
                {"from": "gpt", "value": reply},
            ],
        }
        for i, reply in enumerate(REPLIES)
    ]
    conversations.append(
        {"id": "short", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]}
    )
    conversations.append({"id": "one turn", "conversations": [{"from": "human", "value": "Anyone?"}]})
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(conversations))
    out = tmp_path / "result.json"
    with pdserve_server(tmp_path) as server:
        proc = subprocess.run(
            pdserve_argv(
                "bench",
                "--base-url",
                server.base_url,
                "--dataset-name",
                "sharegpt",
                "--dataset-path",
                str(data),
                "--endpoint-type",
                "chat",
                "--ignore-eos",
                "--num-prompts",
                "4",
                "--warmup",
                "1",
                "--seed",
                "3",
                "--timeout",
                "120",
                "--save-result",
                str(out),
                "--no-progress",
            ),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The counts the bench filtered on are the server's: the same text through /tokenize.
        counts = {r: httpx.post(f"{server.base_url}/tokenize", json={"prompt": r}).json()["count"] for r in REPLIES}
    assert "Endpoint type:                           chat (/v1/chat/completions)" in proc.stdout
    result = json.loads(out.read_text())
    assert (result["endpoint_type"], result["endpoint"], result["dataset_name"], result["dataset_path"]) == (
        "openai-chat",
        "/v1/chat/completions",
        "sharegpt",
        str(data),
    )
    assert result["tokenizer_id"] == f"{server.base_url}/tokenize" and result["ignore_eos"] is True
    assert (result["num_prompts"], result["completed"], result["failed"]) == (4, 4, 0)
    requests = result["requests"]
    assert all(r["success"] and r["error"] == "" for r in requests)
    valid = {n for n in counts.values() if n >= 4}  # vLLM's minimum: "No." is out
    assert {r["expected_output_len"] for r in requests} <= valid
    assert [r["output_tokens"] for r in requests] == [r["expected_output_len"] for r in requests]
    assert result["total_output_tokens"] == sum(r["expected_output_len"] for r in requests)
    # usage.prompt_tokens: the question rendered with the chat template (longer than the question)
    question = len("Question 0: what is the answer?")
    assert all(n > question for n in result["input_lens"]) and result["total_input_tokens"] == sum(result["input_lens"])
