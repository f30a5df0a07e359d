"""Chat messages to a prompt, shared by the server's chat endpoints and the offline `LLM.chat`:
messages as chat templates take them, rendered with the model's (or a given) template."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pdserve.model.tokenizer import Tokenizer

# Set by the renderer itself: chat_template_kwargs may not override them.
TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "tools", "bos_token", "eos_token")


class ChatTemplateError(ValueError):
    """The chat template does not compile, or fails to render these messages."""


class ContinueFinalMessageError(ValueError):
    """`continue_final_message` cannot be honoured (with add_generation_prompt, or the template does
    not write the final content verbatim)."""


def template_turn(
    role: str, content: str, tool_calls: Sequence[Mapping[str, Any]] | None = None,
    tool_call_id: str | None = None, name: str | None = None,
) -> dict[str, Any]:
    """One message as chat templates take it: an assistant's tool calls (OpenAI's
    `{"id", "function": {"name", "arguments"}}`) with their arguments as objects when they are JSON
    text (Qwen's template prints them either way), a tool result's call id."""
    turn: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        calls = []
        for c in tool_calls:
            args = c["function"]["arguments"]
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            calls.append({"id": c.get("id"), "type": "function",
                          "function": {"name": c["function"]["name"], "arguments": args}})
        turn["tool_calls"] = calls
    if tool_call_id is not None:
        turn["tool_call_id"] = tool_call_id
    if name is not None:
        turn["name"] = name
    return turn


def message_turn(message: object) -> dict[str, Any]:
    """An OpenAI-style message dict (vLLM's offline `LLM.chat` input) as `template_turn` makes it:
    content a string, None, or a list of `{"type": "text", "text": ...}` parts (joined by newlines,
    as the server does). TypeError for a message that is not a dict with a string role, ValueError
    for a content part that is not text (images among them: pdserve serves text models). Other
    keys pass through to the template as given."""
    if not isinstance(message, Mapping):
        raise TypeError(f"a chat message must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str):
        raise TypeError(f"a chat message needs a string 'role', got {message!r}")
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, Sequence):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in ("image_url", "image", "input_image", "image_pil", "image_embeds"):
                raise ValueError("image content parts are not supported: pdserve serves text-only models")
            if kind != "text" or not isinstance(part.get("text"), str):  # type: ignore[union-attr]
                raise ValueError(f"a content part must be {{'type': 'text', 'text': str}}, got {part!r}")
            texts.append(part["text"])  # type: ignore[index]
        text = "\n".join(texts)
    else:
        raise TypeError(f"a message's content must be a string or a list of text parts, got {type(content).__name__}")
    turn = template_turn(role, text, message.get("tool_calls"), message.get("tool_call_id"), message.get("name"))
    return {**{k: v for k, v in message.items() if k not in turn and k != "tool_calls"}, **turn}


def render_chat(
    tokenizer: Tokenizer, turns: list[dict[str, Any]], add_generation_prompt: bool = True,
    continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None, chat_template: str | None = None,
) -> str:
    """`turns` (from `template_turn`) rendered with `chat_template` (Jinja source; None: the
    tokenizer's), `tools` and `template_kwargs` (whose "chat_template" key is left out: the caller
    resolves it). With `continue_final_message` (vLLM's and Hugging Face's) the text ends right
    after the final message's content, so the model continues that message.
    ValueError for kwargs that set the renderer's own variables, ContinueFinalMessageError for a
    continue_final_message that cannot be honoured;
    ChatTemplateError when the template does not compile or render."""
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k != "chat_template"}
    taken = sorted(set(kwargs) & set(TEMPLATE_VARIABLES))
    if taken:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(taken)}")
    if continue_final_message:
        if add_generation_prompt:
            raise ContinueFinalMessageError("continue_final_message and add_generation_prompt are not compatible: use "
                             "continue_final_message to continue the final message, add_generation_prompt "
                             "to start a new assistant message")
        if not turns:
            raise ContinueFinalMessageError("continue_final_message needs a final message to continue")
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tools=tools,
                                             chat_template=chat_template, **kwargs)
    except Exception as e:  # a syntax error, or a template's raise_exception(), e.g. a role order it rejects
        raise ChatTemplateError(f"cannot apply the chat template: {e}") from None
    if not continue_final_message:
        return text
    # As Hugging Face's: cut after the last occurrence of the final content (templates may strip it).
    final = turns[-1]["content"]
    if not final.strip() or final.strip() not in text:
        raise ContinueFinalMessageError(
            "continue_final_message is set but the final message does not appear in the rendered chat (the "
            "template must write its content verbatim, and it must not be empty)")
    at = text.rindex(final.strip())
    if text[at:at + len(final.lstrip())] == final.lstrip():
        return text[:at + len(final.lstrip())]
    return text[:at + len(final.strip())]
