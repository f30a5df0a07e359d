"""Offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pdserve.config import (
    DEFAULT_MAX_LORA_RANK,
    DEFAULT_MAX_LORAS,
    CacheConfig,
    EngineConfig,
    KVCacheDType,
    LoRAConfig,
    PoolingType,
    SchedulerConfig,
    SpeculativeConfig,
)
from pdserve.engine.beam_driver import BeamPrompt, OfflineBeamSearch, prompt_token_ids
from pdserve.engine.beam_search import BeamSearchOutput, BeamSearchParams
from pdserve.engine.chat import message_turn, render_chat
from pdserve.engine.engine import LLMEngine
from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.outputs import CompletionOutput, EmbeddingOutput, RequestOutput, StepOutput
from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.sampling_params import SamplingDefaults, SamplingParams
from pdserve.engine.spec.stats import SpecDecodeStats
from pdserve.model.tokenizer import load_chat_template

Prompt = str | list[int]
# vLLM's TextPrompt / TokensPrompt: {"prompt": str} or {"prompt_token_ids": [...]}, with an optional
# "cache_salt" (the prompt shares prefix-cache blocks only with prompts of the same salt).
PromptDict = Mapping[str, object]
ChatMessage = Mapping[str, Any]  # OpenAI's: {"role", "content"} (and tool_calls, tool_call_id, name)
_P = TypeVar("_P", SamplingParams, PoolingParams)


class LLM:
    """Generate offline with the pdserve engine.

    `model` is a local Hugging Face directory or `dummy:<preset>`; `dtype` is "auto", "bfloat16",
    "float16" or "float32". Extra keyword arguments size the cache and the scheduler; on CUDA,
    `enforce_eager=True` turns off the CUDA graphs of decode-only steps. `generation_config="auto"`
    takes the model's recommended sampling values (generation_config.json) as the defaults of
    `get_default_sampling_params()`, used when `generate` gets none; `override_generation_config`
    (generation_config.json keys) wins over them. `enable_lora=True` lets `generate` take
    `lora_request=LoRARequest(name, id, path)` (PEFT adapters, loaded on first use; up to
    `max_loras` on the device, of rank up to `max_lora_rank`). `scheduling_policy="priority"` serves
    requests by the `priority` that `generate` takes (lower first), "fcfs" (the default) by arrival.
    `embed` pools prompts into vectors, by `pooling_type` ("last", the default, or "mean").
    `speculative_config={"method": "ngram", "num_speculative_tokens": k, ...}` (vLLM's keys) turns
    on n-gram speculative decoding; `spec_decode_stats()` reports its acceptance.
    `kv_cache_dtype` (vLLM's): "auto" stores the KV cache in the model's dtype, "fp8" / "fp8_e4m3" /
    "fp8_e5m2" in float8 (about twice the blocks in `kv_cache_gib`).
    """

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "auto",
        seed: int = 0,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_gib: float = 1.0,
        kv_cache_dtype: KVCacheDType = "auto",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "fcfs",
        threads: int | None = None,
        enforce_eager: bool = False,
        generation_config: str = "auto",
        override_generation_config: dict[str, float | int] | None = None,
        enable_lora: bool = False,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        pooling_type: PoolingType = "last",
        speculative_config: Mapping[str, object] | SpeculativeConfig | None = None,
    ) -> None:
        if generation_config not in ("auto", "vllm"):
            raise ValueError(f"generation_config must be 'auto' or 'vllm', got {generation_config!r}")
        if scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {scheduling_policy!r}")
        config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,  # type: ignore[arg-type]
            seed=seed,
            threads=threads,
            enforce_eager=enforce_eager,
            generation_config=generation_config,  # type: ignore[arg-type]
            override_generation_config=SamplingDefaults.from_generation_config(override_generation_config or {}),
            pooling_type=pooling_type,
            speculative=SpeculativeConfig.from_dict(speculative_config)
            if isinstance(speculative_config, Mapping) else speculative_config,
            lora=LoRAConfig(enable_lora=enable_lora, max_loras=max_loras, max_lora_rank=max_lora_rank),
            cache=CacheConfig(
                block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_gib=kv_cache_gib,
                cache_dtype=kv_cache_dtype, enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                enable_chunked_prefill=enable_chunked_prefill,
                policy=scheduling_policy,  # type: ignore[arg-type]
            ),
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding's lifetime counters (drafts, draft tokens, accepted tokens; their
        acceptance rate), or None when it is off."""
        return self.engine.stats().spec_decode

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's recommended values (see the class doc), vLLM's method."""
        return self.engine.sampling_defaults.params()

    def generate(
        self,
        prompts: Prompt | PromptDict | Sequence[Prompt | PromptDict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
        tokenization_kwargs: Mapping[str, int | None] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Invalid prompts raise ValueError before any runs.
        `lora_request`: an adapter for every prompt, or one (or None) per prompt (needs enable_lora).
        `priority`: one per prompt, lower first (needs scheduling_policy="priority"), as vLLM's.
        A prompt keeps only its last `truncate_prompt_tokens` tokens when its SamplingParams say so,
        or `tokenization_kwargs={"truncate_prompt_tokens": k}` for all (vLLM 0.17's spelling).
        A prompt may be vLLM's dict, `{"prompt": text}` or `{"prompt_token_ids": ids}`, with a
        `"cache_salt"`: it then shares prefix-cache blocks only with prompts of the same salt. Lists
        may mix the forms; any other form is a TypeError naming it."""
        unpacked = [_unpack(p) for p in _prompt_list(prompts)]
        prompts = [p for p, _ in unpacked]
        salts = [salt for _, salt in unpacked]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        params = _with_tokenization_kwargs(params, tokenization_kwargs)
        loras = (list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * len(prompts))
        if len(loras) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(loras)} LoRA requests")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(priorities)} priorities")
        for prio in priorities:
            self.engine.validate_priority(prio)
        token_ids = [self.engine.truncate_prompt(self.engine.tokenize(p), sp)
                     for p, sp in zip(prompts, params, strict=True)]
        for ids, sp in zip(token_ids, params, strict=True):
            self.engine.validate_prompt(ids, sp)
            if sp.structured_outputs is not None:
                self.engine.structured.validate(sp.structured_outputs)
        results: dict[str, RequestOutput] = {}
        choices: dict[str, tuple[RequestOutput, CompletionOutput]] = {}  # engine request id -> its choice
        order, later = [], []
        for p, ids, sp, lora, prio, salt in zip(prompts, token_ids, params, loras, priorities, salts, strict=True):
            rid = str(next(self._ids))
            req = self.engine.add_request(rid, ids, dataclasses.replace(sp, n=1), lora_request=lora, priority=prio,
                                          cache_salt=salt)
            order.append(rid)
            ro = results[rid] = RequestOutput(
                rid, p if isinstance(p, str) else None, list(req.prompt_token_ids),
                [CompletionOutput(i, "", [], None) for i in range(sp.n)],
            )
            choices[rid] = (ro, ro.outputs[0])
            for i in range(1, sp.n):  # choice i draws from seed + i, as the server's
                seed = None if sp.seed is None else (sp.seed + i) % 2**64
                choice_params = dataclasses.replace(sp, n=1, seed=seed)
                later.append((f"{rid}-{i}", ids, choice_params, lora, prio, salt, ro, ro.outputs[i]))
        outs = self._first_tokens(list(choices)) if later else []
        for cid, p, sp, lora, prio, salt, ro, comp in later:  # now the prompts are in the prefix cache
            self.engine.add_request(cid, p, sp, lora_request=lora, priority=prio, cache_salt=salt)
            choices[cid] = (ro, comp)
        for out in outs + self.engine.run_until_done():
            ro, comp = choices[out.request_id]
            comp.token_ids.extend(out.new_token_ids)
            comp.text += out.new_text
            if out.prompt_logprobs is not None and comp.index == 0:
                ro.prompt_logprobs = out.prompt_logprobs
            if out.logprobs is not None:
                comp.logprobs = (comp.logprobs or []) + out.logprobs
                comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + sum(lp.logprob for lp in out.logprobs)
            if out.finished:
                comp.finish_reason = out.finish_reason
                ro.finished = all(c.finish_reason is not None for c in ro.outputs)
                if comp.index == 0:  # the prompt's own lookup (later choices find it cached by design)
                    ro.num_cached_tokens = out.num_cached_tokens
        return [results[r] for r in order]

    def chat(
        self,
        messages: Sequence[ChatMessage] | Sequence[Sequence[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's: generate from one conversation (a list of `{"role", "content"}` dicts; content
        text or `{"type": "text", "text": ...}` parts, no images) or a list of them, one
        RequestOutput each, its `prompt` the rendered text. Rendered as the server renders chat
        (engine/chat.py): with `chat_template` (Jinja text or a file, else `chat_template_kwargs`'
        "chat_template", else the model's), `tools` and the other `chat_template_kwargs` passed to
        the template; `add_generation_prompt` opens an assistant turn, `continue_final_message`
        (with add_generation_prompt=False) leaves the final message open for the model to continue.
        The rest as `generate`; `use_tqdm` is accepted and ignored. Bad messages or a template that
        fails raise (ValueError / TypeError) before any runs."""
        del use_tqdm
        if isinstance(messages, str | Mapping) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of message dicts, or a list of such lists")
        batch = bool(messages) and not isinstance(messages[0], Mapping)
        conversations = list(messages) if batch else [messages]
        template = chat_template
        if template is None and chat_template_kwargs is not None:
            template = chat_template_kwargs.get("chat_template")
        if template is not None:
            if not isinstance(template, str):
                raise TypeError("chat_template must be a string (Jinja text or a file)")
            template = load_chat_template(template)
        texts = []
        for conversation in conversations:
            if isinstance(conversation, str | Mapping) or not isinstance(conversation, Sequence):
                raise TypeError(f"a conversation must be a list of message dicts, got {type(conversation).__name__}")
            turns = [message_turn(m) for m in conversation]
            texts.append(render_chat(self.tokenizer, turns, add_generation_prompt, continue_final_message, tools,
                                     chat_template_kwargs, template))
        # The template writes any BOS itself, as the server's chat.
        prompts = [{"prompt_token_ids": self.tokenizer.encode(t, add_special_tokens=False)} for t in texts]
        outputs = self.generate(prompts, sampling_params, lora_request)
        for out, text in zip(outputs, texts, strict=True):
            out.prompt = text
        return outputs

    def beam_search(
        self,
        prompts: BeamPrompt | Sequence[BeamPrompt],
        params: BeamSearchParams,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's: the best `params.beam_width` sequences of each prompt (`{"prompt": text}`,
        `{"prompt_token_ids": ids}`, or the text or ids), best first, by engine/beam_search.py.
        Each sequence's `tokens` include the prompt and its `text` is them all decoded; up to
        `concurrency_limit` prompts are searched at once (all by default); `use_tqdm` is accepted
        and ignored. Invalid prompts raise ValueError before any runs."""
        del use_tqdm
        if isinstance(prompts, str | Mapping) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [prompt_token_ids(self.engine, p) for p in prompts]  # type: ignore[union-attr]
        loras = list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * len(ids)
        if len(loras) != len(ids):
            raise ValueError(f"{len(ids)} prompts but {len(loras)} LoRA requests")
        search = OfflineBeamSearch(self.engine, params, self._ids)
        search.validate(ids)
        limit = concurrency_limit or max(len(ids), 1)
        return [out for k in range(0, len(ids), limit) for out in search.run(ids[k:k + limit], loras[k:k + limit])]

    def embed(self, prompts: Prompt | PromptDict | Sequence[Prompt | PromptDict],
              pooling_params: PoolingParams | None = None,
              tokenization_kwargs: Mapping[str, int | None] | None = None) -> list[EmbeddingOutput]:
        """One embedding per prompt, in order (vLLM's method): each prompt is prefilled and pooled
        (L2-normalized unless `pooling_params` says otherwise), after keeping only its last
        `truncate_prompt_tokens` tokens when `pooling_params` or `tokenization_kwargs` ask. Prompts
        take `generate`'s forms. Invalid prompts raise ValueError (TypeError for a bad form) before
        any runs."""
        unpacked = [_unpack(p) for p in _prompt_list(prompts)]
        (pooling,) = _with_tokenization_kwargs([pooling_params or PoolingParams()], tokenization_kwargs)
        token_ids = [self.engine.truncate_prompt(self.engine.tokenize(p), pooling) for p, _ in unpacked]
        for ids in token_ids:
            self.engine.validate_pooling(ids, pooling)
        order = [str(next(self._ids)) for _ in token_ids]
        for rid, ids, (_, salt) in zip(order, token_ids, unpacked, strict=True):
            self.engine.add_request(rid, ids, SamplingParams(), pooling=pooling, cache_salt=salt)
        finals = {o.request_id: o for o in self.engine.run_until_done() if o.finished}
        return [EmbeddingOutput(rid, ids, finals[rid].embedding or [], finals[rid].num_cached_tokens)
                for rid, ids in zip(order, token_ids, strict=True)]

    def _first_tokens(self, request_ids: list[str]) -> list[StepOutput]:
        """Step until each of `request_ids` has its first token (or has ended): with `n > 1` the
        other choices then find the prompt's KV in the prefix cache. The outputs so far."""
        waiting, outs = set(request_ids), []
        while waiting and self.engine.has_unfinished():
            step = self.engine.step()
            outs.extend(step)
            waiting -= {o.request_id for o in step}
        return outs

    def close(self) -> None:
        self.engine.close()


def _prompt_list(prompts: object) -> list[object]:
    """`prompts` as a list of single prompts: one text, dict or token-id list is wrapped."""
    if isinstance(prompts, str | Mapping):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a string, a list of token ids, a prompt dict or a list of them, "
                        f"got {type(prompts).__name__}")
    return [prompts] if prompts and isinstance(prompts[0], int) else list(prompts)


def _unpack(prompt: object) -> tuple[Prompt, str | None]:
    """A prompt and its cache salt: vLLM's dict form unpacked (ValueError when malformed), a plain
    prompt unsalted (TypeError unless a string or a list of token ids)."""
    if not isinstance(prompt, Mapping):
        if isinstance(prompt, str):
            return prompt, None
        if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt), None  # type: ignore[arg-type]
        raise TypeError("a prompt must be a string, a list of token ids, {'prompt': str} or "
                        f"{{'prompt_token_ids': list[int]}}, got {type(prompt).__name__} {prompt!r:.60}")
    unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"})
    if unknown:
        raise ValueError(f"unsupported prompt keys {unknown}; known: prompt, prompt_token_ids, cache_salt")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError("a prompt dict takes exactly one of 'prompt' and 'prompt_token_ids'")
    text, ids, salt = prompt.get("prompt"), prompt.get("prompt_token_ids"), prompt.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError("cache_salt must be a non-empty string")
    if isinstance(text, str):
        return text, salt
    if isinstance(ids, Sequence) and not isinstance(ids, str) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return list(ids), salt  # type: ignore[arg-type]
    raise ValueError("'prompt' must be a string and 'prompt_token_ids' a list of token ids")


def _with_tokenization_kwargs(params: list[_P], kwargs: Mapping[str, int | None] | None) -> list[_P]:
    """`params` with vLLM 0.17's `tokenization_kwargs` applied: only `truncate_prompt_tokens` is
    known (ValueError for anything else); it overrides each params' own value."""
    if not kwargs:
        return params
    unknown = sorted(set(kwargs) - {"truncate_prompt_tokens"})
    if unknown:
        raise ValueError(f"unsupported tokenization_kwargs {unknown}; known: truncate_prompt_tokens")
    return [dataclasses.replace(p, truncate_prompt_tokens=kwargs["truncate_prompt_tokens"]) for p in params]
