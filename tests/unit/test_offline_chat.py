"""vLLM's offline `LLM.chat` (rendered as the server renders chat) and its prompt forms in
`LLM.generate` / `LLM.embed`, on dummy:qwen3-tiny."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.server.inputs import ChatTemplate, chat_prompt
from pdserve.server.protocol import ChatMessage

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12)
CONVO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
OTHER = [{"role": "user", "content": "what is two plus two"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def llm():
    m = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=128, max_model_len=1024)
    yield m
    m.close()


def served(llm, messages, add_generation_prompt=True, tools=None, kwargs=None, template=None) -> list[int]:
    """The prompt the server (/v1/chat/completions, /tokenize) renders for `messages`."""
    msgs = [ChatMessage.model_validate(m) for m in messages]
    return chat_prompt(llm.engine, msgs, add_generation_prompt, tools, kwargs, template=ChatTemplate(template))


def same(a, b) -> None:
    assert [o.prompt_token_ids for o in a] == [o.prompt_token_ids for o in b]
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].text for o in a] == [o.outputs[0].text for o in b]


def test_chat_one_conversation_is_generate_on_the_servers_prompt(llm):
    ids = served(llm, CONVO)
    (out,) = llm.chat(CONVO, GREEDY)
    same([out], llm.generate([{"prompt_token_ids": ids}], GREEDY))
    assert out.prompt == llm.tokenizer.apply_chat_template(CONVO, add_generation_prompt=True)
    assert out.prompt.endswith("<|im_start|>assistant\n")
    assert len(out.outputs[0].token_ids) == 12


def test_chat_batch_and_greedy_determinism(llm):
    outs = llm.chat([CONVO, OTHER], GREEDY)
    same(outs, llm.generate([served(llm, CONVO), served(llm, OTHER)], GREEDY))
    same(outs, llm.chat([CONVO, OTHER], GREEDY))
    same(outs[1:], llm.chat(OTHER, GREEDY))


def test_chat_text_parts_as_the_server_and_images_refused(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}]
    same(llm.chat(parts, GREEDY), llm.generate([served(llm, parts)], GREEDY))
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]
    with pytest.raises(ValueError, match="image"):
        llm.chat(image, GREEDY)
    with pytest.raises(TypeError, match="role"):
        llm.chat([{"content": "no role"}], GREEDY)


def test_chat_template_and_kwargs_are_honored(llm):
    template = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}{{ suffix }}"
    (out,) = llm.chat(CONVO, GREEDY, chat_template=template, chat_template_kwargs={"suffix": "GO>"})
    assert out.prompt == "[system:be brief][user:hello there]GO>"
    assert out.prompt_token_ids == served(llm, CONVO, kwargs={"suffix": "GO>"}, template=template)
    (via_kwargs,) = llm.chat(CONVO, GREEDY, chat_template_kwargs={"chat_template": template, "suffix": "GO>"})
    assert via_kwargs.prompt == out.prompt
    (thinking_off,) = llm.chat(OTHER, GREEDY, chat_template_kwargs={"enable_thinking": False})
    assert thinking_off.prompt.endswith("<think>\n\n</think>\n\n")
    assert thinking_off.prompt_token_ids == served(llm, OTHER, kwargs={"enable_thinking": False})
    with pytest.raises(ValueError, match="may not set tools"):
        llm.chat(CONVO, GREEDY, chat_template_kwargs={"tools": []})
    with pytest.raises(ValueError, match="cannot apply the chat template"):
        llm.chat(CONVO, GREEDY, chat_template="{{ 1 / 0 }}")


def test_chat_tools_reach_the_template(llm):
    (out,) = llm.chat(CONVO, GREEDY, tools=TOOLS)
    assert "# Tools" in out.prompt and '"get_weather"' in out.prompt
    assert out.prompt_token_ids == served(llm, CONVO, tools=TOOLS)
    assert "# Tools" not in llm.chat(CONVO, GREEDY)[0].prompt


def test_add_generation_prompt_false(llm):
    (out,) = llm.chat(CONVO, GREEDY, add_generation_prompt=False)
    assert out.prompt.endswith("hello there<|im_end|>\n")
    assert out.prompt_token_ids == served(llm, CONVO, add_generation_prompt=False)


def test_continue_final_message_leaves_it_open(llm):
    convo = [*OTHER, {"role": "assistant", "content": "The answer is"}]
    (out,) = llm.chat(convo, GREEDY, add_generation_prompt=False, continue_final_message=True)
    assert out.prompt == llm.tokenizer.apply_chat_template(OTHER, add_generation_prompt=True) + "The answer is"
    same([out], llm.generate([{"prompt_token_ids": llm.tokenizer.encode(out.prompt)}], GREEDY))
    with pytest.raises(ValueError, match="not compatible"):
        llm.chat(convo, GREEDY, continue_final_message=True)
    dropping = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # writes no content
    with pytest.raises(ValueError, match="final message does not appear"):
        llm.chat(convo, GREEDY, chat_template=dropping, add_generation_prompt=False, continue_final_message=True)


def test_prompt_dicts_equal_the_plain_forms(llm):
    text, ids = "the quick brown fox", [(7 * j) % 250 for j in range(16)]
    plain = llm.generate([text, ids], GREEDY)
    same(llm.generate([{"prompt": text}, {"prompt_token_ids": ids}], GREEDY), plain)
    same(llm.generate([{"prompt": text}, ids], GREEDY), plain)  # mixed
    same(llm.generate([text, {"prompt_token_ids": ids}], GREEDY), plain)
    same(llm.generate({"prompt": text}, GREEDY), plain[:1])
    same(llm.generate(text, GREEDY), plain[:1])
    same(llm.generate(ids, GREEDY), plain[1:])
    embedded = llm.embed([text, ids])
    dicts = llm.embed([{"prompt": text}, {"prompt_token_ids": ids}])
    assert [e.embedding for e in dicts] == [e.embedding for e in embedded]
    assert llm.embed({"prompt": text})[0].embedding == llm.embed(text)[0].embedding


@pytest.mark.parametrize("bad, error, match", [
    (3.5, TypeError, "prompts must be"),
    ([3.5], TypeError, "a prompt must be"),
    ([None], TypeError, "a prompt must be"),
    ([["a", "b"]], TypeError, "a prompt must be"),
    ([{"text": "hi"}], ValueError, "unsupported prompt keys"),
    ([{"prompt": "hi", "prompt_token_ids": [1]}], ValueError, "exactly one"),
    ([{"prompt_token_ids": "hi"}], ValueError, "prompt_token_ids"),
    ([{"prompt": 5}], ValueError, "'prompt' must be a string"),
])
def test_bad_prompt_forms_raise(llm, bad, error, match):
    with pytest.raises(error, match=match):
        llm.generate(bad, GREEDY)
    with pytest.raises(error, match=match):
        llm.embed(bad)
    assert not llm.engine.has_unfinished()
