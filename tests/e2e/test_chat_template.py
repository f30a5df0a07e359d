"""vLLM's chat templates against real `pdserve serve` processes, with the official `openai` client
and httpx: `--chat-template` (a file, or the template inline) in place of the tokenizer's, a
request's own `chat_template` (with `--trust-request-chat-template` only) on /v1/chat/completions
and /tokenize, and a template that fails to render as a 400 naming the field, never a 500."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import TINY_MODEL, ServerProcess, pdserve_argv, pdserve_server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
# trim_blocks: the newline after a block tag goes; the one before {% endfor %} stays.
FILE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns here') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
)
FILE_RENDERED = "<system>Be brief.\n<user>Hi\n<bot>"
INLINE_TEMPLATE = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}ANSWER:"
INLINE_RENDERED = "SYSTEM: Be brief.\nUSER: Hi\nANSWER:"
REQUEST_TEMPLATE = "{{ messages[-1]['content'] }} => {{ greeting }}"
REQUEST_RENDERED = "Hi => hello"


@pytest.fixture(scope="module")
def from_file(module_tmp: Path) -> Iterator[ServerProcess]:
    path = module_tmp / "template.jinja"
    path.write_text(FILE_TEMPLATE)
    with pdserve_server(module_tmp, "--chat-template", str(path)) as s:
        yield s


@pytest.fixture(scope="module")
def inline_trusted(module_tmp: Path) -> Iterator[ServerProcess]:
    with pdserve_server(module_tmp, "--chat-template", INLINE_TEMPLATE, "--trust-request-chat-template") as s:
        yield s


def _ids(server: ServerProcess, text: str) -> list[int]:
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30)
    return r.json()["tokens"]


def _chat_prompt_ids(server: ServerProcess, stream: bool = False, **extra: object) -> list[int]:
    """The prompt ids a chat request renders (vLLM's return_token_ids), streamed or not."""
    client = openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)
    kw = {"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0.0,
          "extra_body": {"return_token_ids": True, **extra}}
    if stream:
        first = next(c for c in client.chat.completions.create(stream=True, **kw) if c.model_extra)  # type: ignore[call-overload]
        return first.model_extra["prompt_token_ids"]
    r = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert r.model_extra is not None
    return r.model_extra["prompt_token_ids"]


def _tokenize(server: ServerProcess, **extra: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES, **extra}, timeout=30)


def _refused(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] and err["code"] == "invalid_value"
    return err["message"]


def test_template_from_a_file_replaces_the_tokenizers(from_file: ServerProcess) -> None:
    want = _ids(from_file, FILE_RENDERED)
    assert _chat_prompt_ids(from_file) == want and _chat_prompt_ids(from_file, stream=True) == want
    assert _tokenize(from_file).json()["tokens"] == want


def test_continue_final_message_ends_the_prompt_inside_it(from_file: ServerProcess) -> None:
    """vLLM's continue_final_message: the prompt stops right after the final (assistant) message's
    content, for chat and /tokenize; with add_generation_prompt left true it is a 400 naming it."""
    messages = [*MESSAGES, {"role": "assistant", "content": "Sure, it is"}]
    want = _ids(from_file, "<system>Be brief.\n<user>Hi\n<assistant>Sure, it is")
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    assert _tokenize(from_file, **{**flags, "messages": messages}).json()["tokens"] == want
    client = openai.OpenAI(base_url=from_file.v1_url, api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=2,  # type: ignore[arg-type]
                                       extra_body={**flags, "return_token_ids": True})
    assert r.model_extra is not None and r.model_extra["prompt_token_ids"] == want
    url = f"{from_file.base_url}/v1/chat/completions"
    body = {"model": TINY_MODEL, "messages": messages, "max_tokens": 2, "continue_final_message": True}
    assert "add_generation_prompt" in _refused(httpx.post(url, json=body, timeout=30), "continue_final_message")
    _refused(_tokenize(from_file, messages=messages, continue_final_message=True), "continue_final_message")


def test_request_templates_need_trust(from_file: ServerProcess) -> None:
    """Without --trust-request-chat-template a request's template is refused (vLLM's rule)."""
    body = {"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 2}
    url = f"{from_file.base_url}/v1/chat/completions"
    msg = _refused(httpx.post(url, json={**body, "chat_template": REQUEST_TEMPLATE}, timeout=30), "chat_template")
    assert "--trust-request-chat-template" in msg
    _refused(httpx.post(url, json={**body, "chat_template_kwargs": {"chat_template": REQUEST_TEMPLATE}}, timeout=30),
             "chat_template_kwargs")
    _refused(_tokenize(from_file, chat_template=REQUEST_TEMPLATE), "chat_template")


def test_a_server_template_that_fails_to_render_is_a_400(from_file: ServerProcess) -> None:
    """The file's template refuses tool turns (raise_exception): a 400 naming messages, streamed too."""
    messages = [*MESSAGES, {"role": "assistant", "content": "ok"}, {"role": "tool", "content": "1",
                                                                     "tool_call_id": "c1"}]
    body = {"model": TINY_MODEL, "messages": messages, "max_tokens": 2}
    for stream in (False, True):
        r = httpx.post(f"{from_file.base_url}/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
        assert "no tool turns here" in _refused(r, "messages")


def test_inline_template_and_a_requests_own(inline_trusted: ServerProcess) -> None:
    """--chat-template inline; a trusted request's chat_template (or chat_template_kwargs'
    chat_template, vLLM's other spelling) wins over it, with the request's other kwargs."""
    s = inline_trusted
    want = _ids(s, INLINE_RENDERED)
    assert _chat_prompt_ids(s) == want and _tokenize(s).json()["tokens"] == want
    own = _ids(s, REQUEST_RENDERED)
    kwargs = {"chat_template_kwargs": {"greeting": "hello"}}
    assert _chat_prompt_ids(s, chat_template=REQUEST_TEMPLATE, **kwargs) == own
    assert _chat_prompt_ids(s, stream=True, chat_template=REQUEST_TEMPLATE, **kwargs) == own
    assert _chat_prompt_ids(s, chat_template_kwargs={"greeting": "hello", "chat_template": REQUEST_TEMPLATE}) == own
    assert _tokenize(s, chat_template=REQUEST_TEMPLATE, **kwargs).json()["tokens"] == own


@pytest.mark.parametrize(("template", "why"), [
    ("{% for m in messages %}unclosed", "cannot apply the chat template"),  # does not compile
    ("{{ raise_exception('refused by the template') }}", "refused by the template"),
    ("{{ messages[0]['content'].nope() }}", "cannot apply the chat template"),  # an undefined call
    ("{{ 1 / 0 }}", "cannot apply the chat template"),
])
def test_a_request_template_that_fails_is_a_400_naming_it(inline_trusted: ServerProcess, template: str,
                                                          why: str) -> None:
    body = {"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 2, "chat_template": template}
    for stream in (False, True):
        r = httpx.post(f"{inline_trusted.base_url}/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
        assert why in _refused(r, "chat_template")
    assert why in _refused(_tokenize(inline_trusted, chat_template=template), "chat_template")
    assert httpx.get(f"{inline_trusted.base_url}/health", timeout=10).status_code == 200


def test_a_bad_chat_template_flag_stops_serve_naming_it(tmp_path: Path) -> None:
    """A value that is neither a file nor a template: `pdserve serve` exits 2 before loading anything."""
    r = subprocess.run(pdserve_argv("serve", TINY_MODEL, "--chat-template", str(tmp_path / "missing.jinja")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "argument --chat-template" in r.stderr and "missing.jinja" in r.stderr
