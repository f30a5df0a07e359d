"""Tokenizer: a thin wrapper over the `tokenizers` library, plus streaming detokenization.

Two sources: a Hugging Face model directory (tokenizer.json + tokenizer_config.json), or a
byte-level tokenizer for dummy models (every UTF-8 string round-trips; ChatML special tokens).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
BYTE_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 256, 257, 258 in the byte tokenizer
CHAT_TEMPLATE_CACHE_SIZE = 64  # compiled chat templates kept (the model's, --chat-template's, requests')

# ChatML, with tools in the Hermes format Qwen models use: the tools listed in the system turn, an
# assistant's calls as <tool_call> blocks, tool results as <tool_response> blocks in a user turn.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '\\n<tool_call>\\n{\\\"name\\\": \\\"' + call['function']['name'] + '\\\", \\\"arguments\\\": ' }}"
    "{%- if call['function']['arguments'] is string %}{{- call['function']['arguments'] }}"
    "{%- else %}{{- call['function']['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    # Qwen3's switch (chat_template_kwargs): no thinking means an empty think block up front.
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _filler_token(k: int) -> str:
    """The k-th filler token of the byte tokenizer: ' a', ' b', ..., ' z', ' aa', ... in byte-level form."""
    letters = ""
    k += 1
    while k > 0:
        k, r = divmod(k - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "Ġ" + letters  # 'Ġ' is the byte-level form of ' '


def _token_content(tok: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=CHAT_TEMPLATE_CACHE_SIZE)
def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled in Hugging Face's sandbox (its filters and globals); cached by
    source, as requests may bring their own. jinja2.TemplateSyntaxError when it does not compile."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_chat_template(value: str) -> str:
    """vLLM's `--chat-template` rule: the text of the file `value` names when there is one, else
    `value` itself when it looks like a template (it has "{", "}" or a newline); ValueError
    otherwise (a path that does not exist, say) and when the template does not compile."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            template = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the chat template file {value!r}: {e}") from None
    elif any(c in value for c in "{}\n"):
        template = value
    else:
        raise ValueError(f"{value!r} is neither a file nor a Jinja template")
    try:
        compile_chat_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: {e} (line {e.lineno})") from None
    return template


class Tokenizer:
    """Encode/decode, EOS ids and chat template of one model."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        chat_template: str | None = None,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        extra_eos_tokens: Sequence[str] = (),
        model_max_length: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.hf = tokenizer
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token
        self.extra_eos_tokens = tuple(extra_eos_tokens)
        self.model_max_length = model_max_length
        self._config = dict(config or {})

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json, and tokenizer_config.json / chat_template.jinja when present."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if template is None and (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        max_len = cfg.get("model_max_length")
        return cls(
            _HFTokenizer.from_file(str(tok_file)),
            chat_template=template,
            eos_token=_token_content(cfg.get("eos_token")),
            bos_token=_token_content(cfg.get("bos_token")),
            pad_token=_token_content(cfg.get("pad_token")),
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
            config=cfg,
        )

    @classmethod
    def byte_level(cls, vocab_size: int, model_max_length: int | None = None) -> Tokenizer:
        """Byte tokenizer for dummy models: ids 0-255 are bytes, 256-258 the ChatML specials.

        Ids from 259 up to vocab_size - 1 are filler words (' a', ' b', ... ' aa', ...) that encoding
        never produces (there are no merges) but decoding renders, so any sampled id prints something.
        """
        n_fixed = 256 + len(BYTE_SPECIAL_TOKENS)
        if vocab_size < n_fixed:
            raise ValueError(f"byte tokenizer needs vocab_size >= {n_fixed}, got {vocab_size}")
        b2u = bytes_to_unicode()
        vocab = {b2u[b]: b for b in range(256)}
        vocab.update({tok: 256 + i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)})
        vocab.update({_filler_token(k): n_fixed + k for k in range(vocab_size - n_fixed)})
        tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIAL_TOKENS])
        return cls(
            tok,
            chat_template=CHATML_TEMPLATE,
            eos_token=IM_END,
            pad_token=ENDOFTEXT,
            extra_eos_tokens=(ENDOFTEXT,),
            model_max_length=model_max_length,
            config={"tokenizer_class": "PreTrainedTokenizerFast"},
        )

    # ---- encode / decode ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @cached_property
    def added_tokens(self) -> dict[int, str]:
        """Id -> text of every added token (special tokens included)."""
        return {i: t.content for i, t in self.hf.get_added_tokens_decoder().items()}

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids of the eos token and of any extra end tokens, without duplicates."""
        ids: list[int] = []
        for t in (self.eos_token, *self.extra_eos_tokens):
            i = self.hf.token_to_id(t) if t else None
            if i is not None and i not in ids:
                ids.append(i)
        return tuple(ids)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.token_to_id(self.bos_token) if self.bos_token else None

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with `chat_template` (Jinja source), else the model's chat template
        (extra kwargs, e.g. tools, pass through). jinja2.TemplateError when it does not compile or
        render."""
        return compile_chat_template(chat_template or self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    # ---- save ---------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by transformers' AutoTokenizer)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / "tokenizer.json"))
        cfg = dict(self._config)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg.update(
            chat_template=self.chat_template,
            eos_token=self.eos_token,
            bos_token=self.bos_token,
            pad_token=self.pad_token,
            clean_up_tokenization_spaces=False,
        )
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


class IncrementalDetokenizer:
    """Streaming decode: feed new token ids, get the new text.

    Text is held back while the decoded window ends with U+FFFD (an incomplete UTF-8 character), so
    a delta never contains half a character. `text` is everything emitted so far: the caller checks
    stop strings against it. `flush()` emits whatever is held back at the end of a stream.

    vLLM's `spaces_between_special_tokens=False`, with `skip_special_tokens=False` (it does nothing
    otherwise): an added token that directly follows another added token is emitted as its bare
    text, without the separator the tokenizer's decoder may put before it (WordPiece-style decoders
    join tokens with spaces; byte-level ones, Qwen's and Llama 3's, never do, so there it changes
    nothing), as vLLM's detokenizer for fast tokenizers does.
    """

    MAX_PENDING = 16  # tokens held back before giving up on completing a character

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context_ids: Sequence[int] = (),
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Added tokens rendered bare after another added token (empty: none are).
        self._bare: dict[int, str] = {} if skip_special_tokens or spaces_between_special_tokens \
            else tokenizer.added_tokens
        self._after_added = False  # the last id fed was an added token (and _bare is in use)
        self._ids: list[int] = list(context_ids[-4:])  # a little prompt context for spacing rules
        self._n_context = len(self._ids)
        self._prefix = 0  # window start: decoding from here is stable
        self._read = len(self._ids)  # tokens before this index have been emitted
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        """The ids fed so far (without the prompt context)."""
        return self._ids[self._n_context :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, force: bool) -> str:
        prefix = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        if pending == 0 or (full.endswith("\ufffd") and not force and pending < self.MAX_PENDING):
            return ""
        delta = full[len(prefix) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def add(self, token_ids: Iterable[int]) -> str:
        """Append ids; return the newly completed text (possibly empty)."""
        if self._bare:
            return "".join(self._add_one(t) for t in token_ids)
        self._ids.extend(token_ids)
        return self._emit(force=False)

    def _add_one(self, token_id: int) -> str:
        """Append one id (spaces_between_special_tokens False): an added token after another as its bare text."""
        bare = self._bare.get(token_id)
        follows, self._after_added = self._after_added, bare is not None
        if bare is None or not follows:
            self._ids.append(token_id)
            return self._emit(force=False)
        held = self._emit(force=True)  # (nothing: the added token before it was complete text)
        self._ids.append(token_id)
        self._prefix, self._read = len(self._ids) - 1, len(self._ids)
        self.text += bare
        return held + bare

    def flush(self) -> str:
        """Emit any held-back text, incomplete characters included (end of stream)."""
        return self._emit(force=True)
