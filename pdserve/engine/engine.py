"""The engine: one step loop (schedule -> run -> sample -> detokenize) over one model.

A role (standalone, prefill, decode) is a configuration of this engine: the KV connector plugs
into the scheduler's and runner's seams; the loop itself does not change.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.config import EngineConfig
from pdserve.engine.bad_words import BadWords
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.cpu import apply_cpu_placement, keep_freed_memory
from pdserve.engine.cuda_graphs import StaticDecoder
from pdserve.engine.kv_cache import KVCache, plan_layout
from pdserve.engine.logprobs import TokenLogprob
from pdserve.engine.lora import LoRAManager
from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.outputs import StepOutput
from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling_params import SamplingDefaults, SamplingParams
from pdserve.engine.scheduler import ScheduledBatch, Scheduler
from pdserve.engine.spec.ngram import NgramProposer
from pdserve.engine.spec.stats import SpecDecodeStats
from pdserve.engine.structured import StructuredOutputManager
from pdserve.engine.text import TextState
from pdserve.engine.truncation import truncate_prompt
from pdserve.kv.factory import make_connector, parse_kv_transfer_params
from pdserve.kv.messages import KVTransferParams
from pdserve.model.cpu_linear import can_prepack, prepack_linears_
from pdserve.model.decoder import fuse_projections_
from pdserve.model.kv_quant import KVScales, is_fp8, resolve_kv_cache_dtype
from pdserve.model.loader import LoadedModel, load_model, resolve_dtype
from pdserve.model.lora import AdapterWeights

log = logging.getLogger(__name__)
_POOLED_SAMPLE = SamplingParams(max_tokens=1, temperature=0.0)  # an embedding request's row: sampled, discarded


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up, lifetime
    prefix_cache_hits: int = 0  # of which found computed
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding on
    # vLLM's iteration counters, lifetime: preemptions; prompt tokens of requests that got their first
    # token (counted then, cached or received ones included); tokens generated.
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # With LoRA on: the adapters of running / waiting requests (names, sorted).
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    # Sliding-window models: KV blocks freed before their request ended (out of every layer's window), lifetime.
    num_window_freed_blocks: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        apply_cpu_placement(config.threads, config.cpus)
        try:
            self.device = torch.device(config.device)
        except RuntimeError:
            raise ValueError(f"--device {config.device!r}: expected cpu or cuda[:N]") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {config.device}: torch {torch.__version__} sees no CUDA device on this machine")
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        self.loaded: LoadedModel = load_model(config.model, self.dtype, self.device, seed=config.seed,
                                                  int4_kernels=config.int4_kernels)
        self.model_config = self.loaded.config
        if can_prepack(self.device, self.dtype):
            prepack_linears_(self.loaded.module)
        elif self.device.type == "cuda":
            fuse_projections_(self.loaded.module)
        self.tokenizer = self.loaded.tokenizer
        model_defaults = self.loaded.sampling_defaults if config.generation_config == "auto" else SamplingDefaults()
        self.sampling_defaults = model_defaults.merged(config.override_generation_config)
        if self.sampling_defaults.as_dict():
            log.info("default sampling parameters (from the model's generation config and overrides): %s",
                     self.sampling_defaults.as_dict())
        longest = self.model_config.max_position_embeddings
        if (config.scheduler.max_model_len or 0) > longest:
            raise ValueError(f"--max-model-len {config.scheduler.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({longest})")
        self.max_model_len = config.scheduler.max_model_len or longest
        self.loaded.module.serve_context(self.max_model_len)  # RoPE tables; LongRoPE's factor set
        self.kv_dtype = resolve_kv_cache_dtype(config.cache.cache_dtype, self.dtype)
        kv_scales = self.loaded.module.kv_scales if is_fp8(self.kv_dtype) else ()
        if kv_scales and all(s == KVScales() for s in kv_scales):
            log.warning("--kv-cache-dtype %s without k_scale / v_scale in the checkpoint: scales 1.0 "
                        "(values beyond %g are clipped)", config.cache.cache_dtype, torch.finfo(self.kv_dtype).max)
        self.layout = plan_layout(self.model_config, config.cache, self.kv_dtype, kv_scales)
        role = config.kv_transfer.role
        # Instances that exchange KV keep the cache in shared memory (the shm transport maps it).
        shared = config.cache.shared_memory or role != "standalone"
        self.kv_cache = KVCache(self.layout, self.device, shared=shared)
        self.block_pool = BlockPool(self.layout.num_blocks)
        self.scheduler = Scheduler(
            config.scheduler, self.block_pool, self.layout.block_size,
            prefix_caching=config.cache.enable_prefix_caching, window=self.model_config.kv_window,
        )
        self.runner = ModelRunner(
            self.loaded.module, self.kv_cache.tensor, self.layout.block_size, self.model_config.vocab_size,
            self.device,
        )
        self.lora: LoRAManager | None = None
        self._lora_ids = 0  # the last adapter id handed out
        if config.lora.enable_lora:  # after fusing/packing: the wrappers go around the final linears
            self.lora = self.runner.lora = LoRAManager(self.loaded.module, config.lora, self.dtype, self.device)
            for module in config.lora.lora_modules:
                self.add_lora(LoRARequest(module.name, self.next_lora_id(), module.path))
        if self.device.type == "cuda" and not config.enforce_eager and not self.model_config.is_moe:
            self.enable_static_decode(use_graphs=True)
        self.connector = make_connector(
            config, self.model_config, self.kv_cache, self.scheduler, self.runner, config.kv_transfer.token
        )
        self._texts: dict[str, TextState] = {}
        self._eos = frozenset(self.loaded.eos_token_ids)
        self.structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                  tuple(self.loaded.eos_token_ids))
        # Speculative decoding drafts on instances that decode (a prefill instance emits one token).
        self.proposer: NgramProposer | None = None
        self.spec_stats = SpecDecodeStats()
        if config.speculative is not None and role != "prefill":
            self.proposer = NgramProposer(config.speculative)
        self._pending: list[StepOutput] = []
        self.step_count = 0
        self.prompt_tokens = 0  # EngineStats.prompt_tokens / generation_tokens
        self.generation_tokens = 0
        # Called after each step with its token count as vLLM's iteration_tokens_total counts it
        # (the prompts that got their first token, plus the tokens generated), on the engine thread.
        self.on_iteration: Callable[[int], None] | None = None
        self.idle = True  # the last step had nothing to compute

    def enable_static_decode(self, use_graphs: bool) -> None:
        """Run decode-only steps at static, bucketed shapes (cuda_graphs.py), replayed from CUDA
        graphs when `use_graphs` (captured here). The padding rows write to the pool's padding block
        (reserved here if a sliding window has not reserved it already). Called at start on CUDA
        unless enforce_eager; callable eagerly on any device (tests)."""
        scratch = self.block_pool.padding_block()
        static = StaticDecoder(
            self.loaded.module, self.kv_cache.tensor, self.layout.block_size, self.max_model_len,
            self.config.scheduler.max_num_seqs, scratch, self.device, use_graphs,
        )
        t0 = time.perf_counter()
        static.capture()
        if use_graphs:
            log.info("captured %d CUDA graphs (batch sizes %s) in %.1f s", len(static.buckets), static.buckets,
                     time.perf_counter() - t0)
        self.runner.static = static

    # ---- LoRA adapters -------------------------------------------------------------------------
    def lora_manager(self) -> LoRAManager:
        """The adapter manager; ValueError when LoRA is off."""
        if self.lora is None:
            raise ValueError("LoRA adapters need the engine started with LoRA enabled (--enable-lora)")
        return self.lora

    def _loras_in_use(self) -> set[int]:
        return {r.lora.lora_int_id for r in self.scheduler.requests.values() if r.lora is not None}

    def next_lora_id(self) -> int:
        """An adapter id no adapter loaded so far had (ids key the prefix cache: never reused)."""
        self._lora_ids += 1
        return self._lora_ids

    def add_lora(self, lora: LoRARequest, weights: AdapterWeights | None = None) -> None:
        """Load an adapter (engine thread; `weights` read beforehand off this thread, or read here).
        ValueError: LoRA off, a bad adapter, or max_loras loaded and in use."""
        manager = self.lora_manager()
        if weights is None:
            weights = manager.read(lora.lora_name, lora.lora_path)
        manager.install(lora, weights, self._loras_in_use())

    def remove_lora(self, name: str) -> None:
        """Unload the adapter called `name`; ValueError when unknown or in use."""
        lora = self.lora_manager().by_name(name)
        if lora is None:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        if lora.lora_int_id in self._loras_in_use():
            raise ValueError(f"LoRA adapter {name!r} is in use by unfinished requests")
        self.lora_manager().remove(lora.lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return list(self.lora.loaded.values()) if self.lora is not None else []

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """A text prompt's ids with the tokenizer's special tokens (a BOS, for Llama), as vLLM's
        offline API; token ids as given."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def truncate_prompt(self, token_ids: list[int], params: SamplingParams | PoolingParams) -> list[int]:
        """The prompt cut to its last `params.truncate_prompt_tokens` ids (vLLM's; -1: as many as the
        context leaves room for next to max_tokens, or the whole context for an embedding). A k the
        context cannot hold is a ValueError naming the field; a prompt still too long is left to
        `validate_prompt` / `validate_pooling`."""
        reserved = 0 if isinstance(params, PoolingParams) else params.max_tokens or 1
        return truncate_prompt(token_ids, params.truncate_prompt_tokens, self.max_model_len, reserved)

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError with a user-facing message if the request cannot be served. Cheap checks
        only: an output constraint's grammar is compiled by `structured.validate` (the server runs
        it off its event loop) or when the request is added."""
        self._check_ids(token_ids)
        vocab = self.model_config.vocab_size
        bad_bias = next((t for t, _ in params.logit_bias if not 0 <= t < vocab), None)  # type: ignore[misc]
        if bad_bias is not None:
            raise ValueError(f"logit_bias names token id {bad_bias}, out of range for vocabulary size {vocab}")
        self._check_token_filters(params)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} (prompt plus at least one generated token)"
            )
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(token_ids)} tokens exceeds this "
                f"model's maximum context length of {self.max_model_len}"
            )
        self._check_blocks(len(token_ids) + 1)

    def _check_blocks(self, num_tokens: int, whole: bool = False) -> None:
        """ValueError when `num_tokens` need more KV blocks at once than the whole cache has. A model
        whose every layer is windowed, prefilled in chunks, holds at most the window plus a chunk at
        once (scheduler.py frees what slid out of it), unless `whole`: a request whose KV moves to or
        from another instance keeps every block of its prompt until the transfer is over."""
        bs = self.layout.block_size
        blocks_needed = -(-num_tokens // bs)
        window, sched = self.model_config.kv_window, self.config.scheduler
        if window is not None and not whole and sched.enable_chunked_prefill:
            blocks_needed = min(blocks_needed, -(-(window + sched.max_num_batched_tokens) // bs) + 1)
        if blocks_needed > self.block_pool.num_usable:
            raise ValueError(
                f"the prompt needs {blocks_needed} KV blocks; the cache has {self.block_pool.num_usable} in all"
            )

    def _check_token_filters(self, params: SamplingParams) -> None:
        """vLLM's allowed_token_ids within the vocabulary (the tokenizer's, as vLLM bounds them, within the
        model's), bad_words tokenized into it: ValueError naming the field otherwise."""
        allowed = params.allowed_token_ids
        vocab = min(self.model_config.vocab_size, self.tokenizer.vocab_size)
        if allowed and (min(allowed) < 0 or max(allowed) >= vocab):
            bad = sorted({t for t in allowed if not 0 <= t < vocab})
            raise ValueError(f"allowed_token_ids names token ids {bad[:8]}, out of range for vocabulary size {vocab}")
        self._bad_words(params)

    def _bad_words(self, params: SamplingParams) -> BadWords | None:
        """The request's bad_words tokenized (engine/bad_words.py); ValueError naming the field."""
        if not params.bad_words:
            return None
        return BadWords.compile(params.bad_words, self.tokenizer, self.model_config.vocab_size)

    def _check_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:  # C-speed scan; the generator only on error
            bad = next(t for t in token_ids if not 0 <= t < vocab)
            raise ValueError(f"token id {bad} is out of range for vocabulary size {vocab}")

    def validate_pooling(self, token_ids: list[int], pooling: PoolingParams) -> None:
        """An embedding request's checks (ValueError, a user-facing message): the prompt may fill the
        whole context (nothing is generated); `dimensions` at most the hidden size."""
        self._check_ids(token_ids)
        hidden = self.model_config.hidden_size
        if pooling.dimensions is not None and pooling.dimensions > hidden:
            raise ValueError(f"dimensions={pooling.dimensions} exceeds this model's embedding size of {hidden}")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                             f"{self.max_model_len}")
        self._check_blocks(len(token_ids), whole=True)

    def validate_priority(self, priority: int) -> None:
        """A priority other than 0 needs the priority policy (as in vLLM): ValueError otherwise."""
        policy = self.config.scheduler.policy
        if priority != 0 and policy != "priority":
            raise ValueError(f"priority {priority} needs the priority scheduling policy; this instance schedules "
                             f"{policy} (pdserve serve --scheduling-policy priority)")

    def validate_request(
        self, token_ids: list[int], params: SamplingParams, kv_transfer_params: KVTransferParams | dict | None,
        pooling: PoolingParams | None = None,
    ) -> KVTransferParams | None:
        """Every cheap add-time check, callable from any thread: ValueError with a user-facing message."""
        if pooling is not None:
            self.validate_pooling(token_ids, pooling)
            if kv_transfer_params is not None:
                raise ValueError("an embedding request computes its prompt here: it takes no kv_transfer_params")
            return None
        self.validate_prompt(token_ids, params)
        kvp = parse_kv_transfer_params(kv_transfer_params)
        if kvp is not None and kvp.do_remote_prefill and params.prompt_logprobs is not None:
            raise ValueError("prompt logprobs need the prompt computed on this instance: send the request "
                             "without kv_transfer_params (a proxy routes echo requests so)")
        if kvp is not None and (kvp.do_remote_decode or kvp.do_remote_prefill):
            self._check_blocks(len(token_ids) + 1, whole=True)
        if self.connector is not None:
            self.connector.validate(kvp, len(token_ids))
        elif kvp is not None and (kvp.do_remote_decode or kvp.do_remote_prefill):
            raise ValueError("this instance runs --role standalone: it neither sends nor receives KV")
        return kvp

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        kv_transfer_params: KVTransferParams | dict | None = None,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        pooling: PoolingParams | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        """Queue a request (with the adapter `lora_request`, loaded now if it is not). ValueError (a
        user-facing message) when it cannot be served. With `pooling` it is an embedding request:
        prefill only, it ends with its prompt's pooled vector (`StepOutput.embedding`); `params` is
        then unused (its one discarded sample is greedy). `cache_salt` (vLLM's): it shares prefix-cache
        blocks only with requests of the same salt."""
        token_ids = self.tokenize(prompt)
        if pooling is not None:
            pooling = dataclasses.replace(pooling, pooling_type=pooling.pooling_type or self.config.pooling_type)
            params = _POOLED_SAMPLE
        kvp = self.validate_request(token_ids, params, kv_transfer_params, pooling)
        self.validate_priority(priority)  # `priority`: lower first, under the priority policy
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if self.connector is not None:
            self.connector.check_request_id(request_id)
        if lora_request is not None:
            self.lora_manager().ensure(lora_request, self._loras_in_use())
        req = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self._eos,
            max_model_len=self.max_model_len,
            kv_transfer_params=kvp,
            lora=lora_request,
            priority=priority,
            pooling=pooling,
            cache_salt=cache_salt,
            bad_words=self._bad_words(params),
        )
        if params.structured_outputs is not None:  # compiles the grammar: ValueError when it is bad
            self.structured.add(request_id, params.structured_outputs)
        if self.connector is not None:
            self.connector.on_add(req, kvp)
        self.scheduler.add(req)
        self._texts[request_id] = TextState(self.tokenizer, params.stop, params.skip_special_tokens,
                                            params.include_stop_str_in_output, params.spaces_between_special_tokens)
        return req

    def abort_request(self, request_id: str) -> bool:
        """Abort now: blocks are freed at once. False when the request is unknown or already done."""
        req = self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        if req is None:
            return False
        self._pending.append(self._final_output(req, [], ""))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

    def stats(self) -> EngineStats:
        s = self.scheduler
        pool = self.block_pool
        running_loras = waiting_loras = ()
        if self.lora is not None:
            running_loras = tuple(sorted({r.lora.lora_name for r in s.running if r.lora is not None}))
            waiting_loras = tuple(sorted({r.lora.lora_name for r in s.waiting if r.lora is not None}))
        return EngineStats(
            len(s.running), len(s.waiting), pool.num_free, pool.num_usable, pool.num_cached,
            s.prefix_cache_queries, s.prefix_cache_hits,
            self.spec_stats if self.proposer is not None else None,
            s.num_preemptions, self.prompt_tokens, self.generation_tokens, running_loras, waiting_loras,
            s.num_window_freed_blocks,
        )

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduling step. Returns the new tokens (and finishes) of every affected request."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule(self._drafts())
        self.idle = batch.is_empty
        outputs.extend(self._drain_errors())
        if batch.is_empty:
            return outputs
        if self.connector is not None:
            self.connector.begin_step(batch.prefills)
        try:
            result = self.runner.execute(batch, self._bitmask(batch))
        finally:
            if self.connector is not None:
                self.connector.end_step()
        self.step_count += 1
        for req, _ in batch.prefills:
            req.prompt_logprobs.extend(result.prompt_logprobs.get(req.request_id, ()))
        for rid, drafts in batch.spec.items():
            self.spec_stats = self.spec_stats.add(len(drafts), len(result.accepted[rid]))
        advanced = self.scheduler.update_after_step(batch, result.tokens, result.accepted)
        self._count_tokens(advanced)
        outputs.extend(self._process(advanced, result.logprobs, result.pooled))
        return outputs

    def _count_tokens(self, advanced: list[tuple[Request, int]]) -> None:
        """vLLM's iteration stats: tokens generated this step, and the prompts of the requests that
        got their first token (a request's output holds no other tokens yet)."""
        generated = prompts = 0
        for req, n in advanced:
            generated += n
            if n and len(req.output_token_ids) == n:
                prompts += req.num_prompt_tokens
        self.generation_tokens += generated
        self.prompt_tokens += prompts
        if self.on_iteration is not None:
            self.on_iteration(prompts + generated)

    def _drafts(self) -> dict[str, list[int]] | None:
        """This step's drafts by request id; a constrained request's only as far as its grammar
        allows them (structured.valid_drafts)."""
        if self.proposer is None:
            return None
        drafts = self.proposer.propose(self.scheduler.running)
        if self.structured.active:
            drafts = {rid: kept for rid, d in drafts.items() if (kept := self.structured.valid_drafts(rid, d))}
        return drafts

    def _bitmask(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Structured outputs: what each row of the step may sample (rows whose sample is kept; a
        speculative row's every position, each after the drafts before it)."""
        if not self.structured.active:
            return None
        rows: list[str | None] = [r.request_id for r in batch.decodes]
        for r, n in batch.prefills:
            if r.request_id in batch.spec:
                rows += [r.request_id] * n
            else:
                rows.append(r.request_id if r.num_computed_tokens + n >= r.num_tokens else None)
        return self.structured.bitmask(rows, self.device, batch.spec)

    def tick(self) -> list[StepOutput]:
        """Housekeeping while idle: KV connector events (frees, lease expiries, landed transfers)."""
        self.idle = True
        self.scheduler.poll_connector()
        return self._drain_errors()

    def _drain_errors(self) -> list[StepOutput]:
        """Final outputs of requests the scheduler ended outside a step (failed KV transfers)."""
        ended = self.scheduler.pop_ended()
        return [self._final_output(r, [], "") for r in ended]

    def _process(
        self, advanced: list[tuple[Request, int]], logprobs: dict[str, list[TokenLogprob]],
        pooled: dict[str, list[float]],
    ) -> list[StepOutput]:
        outs = []
        for req, count in advanced:
            if req.pooling is not None:  # finished with its prompt (scheduler), pooled (runner)
                outs.append(self._final_output(req, [], "", embedding=pooled[req.request_id]))
                continue
            new_ids, delta, hit_stop = self._push_text(req, count)
            lps = logprobs.get(req.request_id)
            lps = lps[: len(new_ids)] if lps is not None else None
            # The prompt's logprobs go out once, with the first token.
            plps = req.prompt_logprobs if req.sampling_params.prompt_logprobs is not None \
                and len(req.output_token_ids) == len(new_ids) else None
            if hit_stop and not req.is_finished:
                self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
            elif hit_stop and len(new_ids) < count:  # it stopped before the token that ended it
                req.status = RequestStatus.FINISHED_STOPPED
            if req.is_finished:
                outs.append(self._final_output(req, new_ids, delta, lps, plps))
            else:
                outs.append(
                    StepOutput(
                        req.request_id, new_ids, delta, False,
                        num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_token_ids),
                        num_cached_tokens=req.num_cached_tokens,
                        logprobs=lps, prompt_logprobs=plps,
                    )
                )
        return outs

    def _push_text(self, req: Request, count: int) -> tuple[list[int], str, bool]:
        """Detokenize the request's `count` newest tokens, up to the first that completes a stop
        string or its grammar; tokens after that one are dropped from its output. Returns the
        tokens kept, their text, and whether the request stops here. As vLLM v1, the EOS or stop
        token id that finished the request (the scheduler's FINISHED_STOPPED) stays in its ids
        and logprobs but its text is left out, unless include_stop_str_in_output."""
        text = self._texts[req.request_id]
        new_ids = req.output_token_ids[len(req.output_token_ids) - count:]
        hide_last = req.status == RequestStatus.FINISHED_STOPPED \
            and not req.sampling_params.include_stop_str_in_output
        delta = ""
        for i, token in enumerate(new_ids):
            piece, hit_stop = ("", False) if hide_last and i == count - 1 else text.push(token)
            delta += piece
            if self.structured.accept(req.request_id, token):  # the output is complete
                hit_stop = True
            if hit_stop:
                del req.output_token_ids[len(req.output_token_ids) - (count - i - 1):]
                return new_ids[: i + 1], delta, True
        return new_ids, delta, False

    def _final_output(
        self, req: Request, new_ids: list[int], delta: str, logprobs: list[TokenLogprob] | None = None,
        prompt_logprobs: list[TokenLogprob] | None = None, embedding: list[float] | None = None,
    ) -> StepOutput:
        text = self._texts.pop(req.request_id, None)
        if text is not None:
            delta += text.flush()
        self.runner.sampler.forget(req.request_id)
        if self.proposer is not None:
            self.proposer.forget(req.request_id)
        self.structured.forget(req.request_id)
        self.runner.pooler.forget(req.request_id)
        return StepOutput(
            req.request_id,
            new_ids,
            delta,
            True,
            finish_reason=req.status.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            error=req.error,
            kv_transfer_params=req.kv_transfer_params,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            embedding=embedding,
            queued_time=req.arrival_time,
            scheduled_time=req.scheduled_time,
        )

    def run_until_done(self, max_idle_s: float = 600.0) -> list[StepOutput]:
        """Step until every request has finished (offline use)."""
        outs: list[StepOutput] = []
        last = time.monotonic()
        while self.has_unfinished():
            step = self.step()
            if step:
                last = time.monotonic()
            elif time.monotonic() - last > max_idle_s:
                raise TimeoutError("engine made no progress")
            if self.idle:
                time.sleep(0.001)  # waiting on remote KV: don't spin
            outs.extend(step)
        return outs

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()
        self.kv_cache.close()
