"""Offline beam search (`LLM.beam_search`): `engine/beam_search.py`'s steps run on the synchronous
engine, every live beam of every prompt in one batch per step, as vLLM's `LLM.beam_search` does."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from pdserve.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from pdserve.engine.engine import LLMEngine
from pdserve.engine.logprobs import TokenLogprob
from pdserve.engine.lora_request import LoRARequest
from pdserve.engine.sampling_params import SamplingParams

# vLLM's TextPrompt / TokensPrompt ({"prompt": text} / {"prompt_token_ids": ids}), or the text or ids.
BeamPrompt = str | list[int] | Mapping[str, str | list[int]]


def prompt_token_ids(engine: LLMEngine, prompt: BeamPrompt) -> list[int]:
    """A prompt's ids: vLLM's prompt dicts or pdserve's text / ids (text with special tokens, as
    `LLM.generate`). ValueError for a dict with neither key."""
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])  # type: ignore[arg-type]
        if "prompt" in prompt:
            return engine.tokenize(prompt["prompt"])
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return engine.tokenize(prompt)


class OfflineBeamSearch:
    """Beam searches of several prompts on one engine (nothing else runs on it meanwhile)."""

    def __init__(self, engine: LLMEngine, params: BeamSearchParams, ids: Iterator[int]) -> None:
        self.engine = engine
        self.params = params
        self.step = params.step_params()
        self._ids = ids  # the LLM's request counter: engine request ids stay unique

    def validate(self, prompts: Sequence[list[int]]) -> None:
        """Every prompt with room for `max_tokens` more tokens in the context, allowed_token_ids in
        the vocabulary (ValueError before any runs)."""
        whole = SamplingParams(max_tokens=self.params.max_tokens, temperature=self.params.temperature,
                               allowed_token_ids=self.params.allowed_token_ids)
        for ids in prompts:
            self.engine.validate_prompt(ids, whole)

    def run(self, prompts: Sequence[list[int]], loras: Sequence[LoRARequest | None]) -> list[BeamSearchOutput]:
        """One search per prompt (`loras[k]`: prompt k's adapter), stepped together."""
        eos = self.engine.loaded.eos_token_ids
        searches = [BeamSearch(p, self.params, eos) for p in prompts]
        while live := [(s, lora) for s, lora in zip(searches, loras, strict=True) if not s.done]:
            self._step([s for s, _ in live], [lora for _, lora in live])
        tok = self.engine.tokenizer
        outputs = []
        for search in searches:
            best = search.result()
            for seq in best:  # vLLM's offline text: the whole sequence, prompt included
                seq.text = tok.decode(seq.tokens, skip_special_tokens=False)
            outputs.append(BeamSearchOutput(best))
        return outputs

    def _step(self, searches: list[BeamSearch], loras: list[LoRARequest | None]) -> None:
        """Each live beam of `searches` as one engine request; every search advanced once."""
        sent: list[list[str]] = []
        for search, lora in zip(searches, loras, strict=True):
            rids = [f"beam-{next(self._ids)}" for _ in search.live]
            for rid, beam in zip(rids, search.live, strict=True):
                self.engine.add_request(rid, beam.tokens, self.step, lora_request=lora)
            sent.append(rids)
        finals = {o.request_id: o for o in self.engine.run_until_done() if o.finished}
        for search, rids in zip(searches, sent, strict=True):
            search.advance([_next_token(finals[rid].logprobs, finals[rid].error) for rid in rids])


def _next_token(logprobs: list[TokenLogprob] | None, error: str | None) -> TokenLogprob:
    if not logprobs:
        raise RuntimeError(f"a beam search step failed: {error or 'no logprobs came back'}")
    return logprobs[0]
