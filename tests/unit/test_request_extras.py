"""vLLM's request extras at the engine level, on dummy:qwen3-tiny (a byte tokenizer): allowed_token_ids,
bad_words, include_stop_str_in_output, spaces_between_special_tokens and cache_salt."""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from pdserve import LLM, SamplingParams
from pdserve.engine.bad_words import BadWords, word_token_ids
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.model.tokenizer import IncrementalDetokenizer, Tokenizer, bytes_to_unicode

PROMPT = [(5 * j) % 250 for j in range(20)]
GREEDY = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 24}


@pytest.fixture(scope="module")
def llm():
    m = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256)
    yield m
    m.close()


@pytest.fixture(scope="module")
def greedy(llm):
    return llm.generate([PROMPT], SamplingParams(**GREEDY))[0].outputs[0]


def gen(llm, **kw):
    return llm.generate([PROMPT], SamplingParams(**kw))[0].outputs[0]


# ---- allowed_token_ids -------------------------------------------------------------------------
def test_allowed_token_ids_restrict_greedy_and_sampled_outputs(llm, greedy):
    allowed = [97, 98, 99, greedy.token_ids[3], 300]
    out = gen(llm, **GREEDY, allowed_token_ids=allowed)
    assert set(out.token_ids) <= set(allowed) and len(out.token_ids) == GREEDY["max_tokens"]
    for seed in range(3):
        sampled = gen(llm, max_tokens=16, temperature=1.5, seed=seed, ignore_eos=True, allowed_token_ids=allowed)
        assert set(sampled.token_ids) <= set(allowed)
    assert gen(llm, **GREEDY, allowed_token_ids=[greedy.token_ids[0]]).token_ids == [greedy.token_ids[0]] * 24


def test_allowed_token_ids_are_checked(llm):
    with pytest.raises(ValueError, match="^allowed_token_ids must not be empty"):
        SamplingParams(allowed_token_ids=[])
    for ids in ([5, 512], [-1]):  # the tiny model's vocabulary is 512
        with pytest.raises(ValueError, match="^allowed_token_ids names token ids"):
            llm.generate([PROMPT], SamplingParams(allowed_token_ids=ids))


# ---- bad_words ---------------------------------------------------------------------------------
def _two_letter_word(token_ids: list[int]) -> tuple[int, str]:
    """The first two consecutive byte tokens of the output that spell a word this byte tokenizer can
    render only with those two tokens: printable ASCII, the first not a lowercase letter or a space
    (its filler tokens are a space and lowercase letters)."""
    for i, (a, b) in enumerate(zip(token_ids, token_ids[1:], strict=False)):
        if 33 <= a < 127 and 33 <= b < 127 and not chr(a).islower():
            return i, chr(a) + chr(b)
    raise AssertionError(f"no such word in {token_ids}")


def test_bad_words_never_appear_in_the_output(llm, greedy):
    i, word = _two_letter_word(greedy.token_ids)  # a two-token word: its last token is banned after its first
    out = gen(llm, **GREEDY, bad_words=[word])
    assert out.token_ids[: i + 1] == greedy.token_ids[: i + 1] and out.token_ids[i + 1] != greedy.token_ids[i + 1]
    assert word not in out.text and word in greedy.text
    first = chr(greedy.token_ids[0])  # a one-token word: never sampled
    out = gen(llm, **GREEDY, bad_words=[first, word])
    assert greedy.token_ids[0] not in out.token_ids and word not in out.text


def test_bad_words_are_checked(llm):
    with pytest.raises(ValueError, match="^bad_words must each have a character other than whitespace"):
        SamplingParams(bad_words=["ok", " \n"])
    assert SamplingParams(bad_words="x").bad_words == ("x",)
    with pytest.raises(ValueError, match="^bad_words tokenize to token ids"):
        BadWords.compile(["\u00e9"], llm.tokenizer, vocab_size=128)  # é is bytes 195 169


def _bpe() -> Tokenizer:
    """A byte-level BPE with one-token words "cat" and " cat" (as GPT-2's "Ġcat"), no " dog"."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = [("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("c", "a"), ("ca", "t"), ("d", "o"), ("do", "g")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf)


def test_bad_words_tokenize_with_and_without_a_leading_space_as_vllm():
    tok = _bpe()
    cat, space_cat, dog, s = (tok.encode(w) for w in ("cat", " cat", "dog", "s"))
    assert len(cat) == len(space_cat) == 1 and cat != space_cat
    # " cat" is another token of the same length: banned too; " dog" is two tokens (" " + "dog"): not.
    assert word_token_ids(["cat", "  dogs"], tok) == [cat, space_cat, dog + s]
    words = BadWords.compile(["cat", "cats"], tok, tok.vocab_size)
    assert words.banned([]) == {cat[0], space_cat[0]}
    assert words.banned([7, cat[0]]) == words.banned([7, space_cat[0]]) == {cat[0], space_cat[0], s[0]}


def test_bad_words_count_a_speculative_rows_earlier_drafts():
    words = BadWords(frozenset({1}), {2: {(5, 6): frozenset({7})}, 1: {(9,): frozenset({8})}})
    assert words.banned([4, 5, 6]) == {1, 7}
    assert words.banned([4, 5], preceding=[6]) == words.banned([], preceding=[5, 6]) == {1, 7}
    assert words.banned([5, 6], preceding=[9]) == {1, 8}
    assert words.banned([6]) == {1}  # the prompt's tail does not start a word: only the output counts


def test_sampler_bans_bad_words_and_keeps_only_allowed_ids():
    sampler = Sampler(torch.device("cpu"), vocab_size=16)
    words = BadWords(frozenset({3}), {1: {(5,): frozenset({4})}})
    banned = Request("b", [1, 2], SamplingParams(temperature=0.0), output_token_ids=[5], bad_words=words)
    allowed = Request("a", [1, 2], SamplingParams(temperature=0.0, allowed_token_ids=[9, 10]))
    logits = torch.zeros(4, 16)
    logits[:, 3], logits[:, 4], logits[:, 2] = 3.0, 2.0, 1.0
    # rows: banned's own token, banned after drafts [7] (4 no longer follows 5), then the same for allowed
    batch = sampler.prepare([banned, banned, allowed, allowed], preceding=[[], [7], [], [7]])
    assert sampler(logits.clone(), batch).tolist() == [2, 4, 9, 9]


def test_speculative_decoding_keeps_bad_words_and_allowed_ids_outputs(llm, greedy):
    """Drafts are verified by rows that ban after their earlier drafts: greedy output is the
    non-speculative one."""
    _, word = _two_letter_word(greedy.token_ids)
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    spec = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256, speculative_config=ngram)
    try:
        for kw in ({"bad_words": [word, "ct"]}, {"allowed_token_ids": [97, 98, 356, greedy.token_ids[5]]}):
            params = SamplingParams(**{**GREEDY, "max_tokens": 48}, **kw)
            ref = llm.generate([PROMPT], params)[0].outputs[0]
            assert spec.generate([PROMPT], params)[0].outputs[0].token_ids == ref.token_ids
        stats = spec.spec_decode_stats()
        assert stats is not None and stats.num_draft_tokens > 0
    finally:
        spec.close()


# ---- include_stop_str_in_output ----------------------------------------------------------------
def _streamed(llm, params: SamplingParams) -> tuple[str, list[str]]:
    engine = llm.engine
    engine.add_request("stream", PROMPT, params)
    deltas = [o.new_text for o in engine.run_until_done() if o.request_id == "stream"]
    return "".join(deltas), deltas


def test_include_stop_str_in_output_keeps_the_stop_string_once(llm, greedy):
    start = greedy.text.index(" cf ")  # in the ASCII part of the greedy text
    stop = greedy.text[start + 1 : start + 5]
    end = greedy.text.index(stop) + len(stop)
    kept = gen(llm, **GREEDY, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == greedy.text[:end] and kept.text.count(stop) == 1 and kept.finish_reason == "stop"
    assert gen(llm, **GREEDY, stop=[stop]).text == greedy.text[: end - len(stop)]
    text, deltas = _streamed(llm, SamplingParams(**GREEDY, stop=[stop], include_stop_str_in_output=True))
    assert text == kept.text and len([d for d in deltas if d]) > 1  # nothing held back: it streams as it comes
    text, _ = _streamed(llm, SamplingParams(**GREEDY, stop=[stop, stop[:2] + "never"], include_stop_str_in_output=True))
    assert text == kept.text


def test_a_stop_token_ids_text_is_left_out_unless_include_stop_str_in_output(llm, greedy):
    """vLLM v1: the stop token id that ended the output stays in its ids and logprobs, its text
    only with include_stop_str_in_output; streamed or not; a speculative row likewise."""
    stop = greedy.token_ids[6]
    j = greedy.token_ids.index(stop)  # its first occurrence ends the output
    shown = llm.tokenizer.decode(greedy.token_ids[:j], skip_special_tokens=False)
    whole = llm.tokenizer.decode(greedy.token_ids[: j + 1], skip_special_tokens=False)
    assert shown != whole
    for include, want in ((False, shown), (True, whole)):
        params = SamplingParams(**GREEDY, stop_token_ids=[stop], include_stop_str_in_output=include, logprobs=1,
                                skip_special_tokens=False)
        out = llm.generate([PROMPT], params)[0].outputs[0]
        assert out.token_ids == greedy.token_ids[: j + 1] and out.finish_reason == "stop"
        assert out.text == want and out.logprobs is not None and len(out.logprobs) == j + 1
        assert out.logprobs[-1].token_id == stop
        assert _streamed(llm, params)[0] == want
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    spec = LLM("dummy:qwen3-tiny", dtype="float32", num_kv_blocks=64, max_model_len=256, speculative_config=ngram)
    try:
        out = spec.generate([PROMPT], SamplingParams(**GREEDY, stop_token_ids=[stop]))[0].outputs[0]
        assert out.token_ids == greedy.token_ids[: j + 1] and out.text == shown
    finally:
        spec.close()


def test_an_eos_tokens_text_is_left_out_unless_include_stop_str_in_output(llm):
    """The same for an EOS the model samples (forced here by allowed_token_ids), shown with
    skip_special_tokens false only when include_stop_str_in_output."""
    eos = llm.tokenizer.token_to_id("<|im_end|>")
    for include, want in ((False, ""), (True, "<|im_end|>")):
        params = SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=[eos], skip_special_tokens=False,
                                include_stop_str_in_output=include)
        out = llm.generate([PROMPT], params)[0].outputs[0]
        assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == want
        assert _streamed(llm, params)[0] == want


# ---- spaces_between_special_tokens ---------------------------------------------------------------
def _wordpiece() -> Tokenizer:
    """A WordPiece-style tokenizer whose decoder puts a space between tokens (added ones too)."""
    vocab = {"[UNK]": 0, "hi": 1, "##s": 2, "there": 3}
    hf = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.decoder = decoders.WordPiece()
    hf.add_special_tokens([AddedToken("<a>", special=True), AddedToken("<b>", special=True)])
    return Tokenizer(hf)


def _detok(tok: Tokenizer, ids: list[int], **kw) -> str:
    d = IncrementalDetokenizer(tok, **kw)
    return "".join(d.add([t]) for t in ids) + d.flush()


def test_spaces_between_special_tokens_as_vllms_fast_detokenizer():
    tok = _wordpiece()
    a, b, hi, s = (tok.token_to_id(t) for t in ("<a>", "<b>", "hi", "##s"))
    ids = [hi, a, b, a, hi, s]
    assert _detok(tok, ids, skip_special_tokens=False) == "hi <a> <b> <a> his"  # the decoder's spaces
    # False: an added token right after another loses the separator; other spacing is the decoder's.
    assert _detok(tok, ids, skip_special_tokens=False, spaces_between_special_tokens=False) == "hi <a><b><a> his"
    assert _detok(tok, ids, spaces_between_special_tokens=False) == _detok(tok, ids)  # skipped anyway


def test_spaces_between_special_tokens_change_nothing_on_a_byte_level_tokenizer(llm):
    params = {
        **GREEDY,
        "temperature": 2.0,
        "seed": 1,
        "skip_special_tokens": False,
        "allowed_token_ids": [256, 257, 258, 97],
    }
    spaced = gen(llm, **params)
    bare = gen(llm, **params, spaces_between_special_tokens=False)
    assert bare.token_ids == spaced.token_ids and bare.text == spaced.text and "><|" in bare.text


# ---- cache_salt --------------------------------------------------------------------------------
def test_cache_salt_shares_the_prefix_cache_only_within_a_salt(llm):
    prompt = list(range(100, 140))  # two full 16-token blocks (and 8 tokens)

    def cached(salt: str | None) -> int:
        p = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        return llm.generate(p, SamplingParams(max_tokens=1))[0].num_cached_tokens

    assert [cached(s) for s in ("a", "a", "b", None, None, "a", "b")] == [0, 32, 0, 0, 32, 32, 32]
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt_token_ids": prompt, "cache_salt": ""})
    text = llm.generate({"prompt": "salted text", "cache_salt": "a"}, SamplingParams(max_tokens=1))[0]
    assert text.prompt == "salted text"
