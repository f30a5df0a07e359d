"""Model, loader, export and tokenizer: pdserve's presets (Qwen3, Qwen3-MoE, Llama, Qwen2, Gemma 3)
exported and run against transformers, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdserve.model import loader
from pdserve.model.decoder import DecoderForCausalLM
from pdserve.model.export import export_model, save_hf_dir
from pdserve.model.loader import LoadedModel, load_model, resolve_dtype
from pdserve.model.presets import get_preset
from pdserve.model.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.unit.paged import PROMPT_LEN, assert_close, make_meta, new_cache, run

transformers = pytest.importorskip("transformers")

PRESETS = ["qwen3-tiny", "qwen3-moe-tiny", "llama-tiny", "qwen2-tiny", "gemma3-tiny"]


@pytest.fixture(scope="module", params=PRESETS)
def pair(request, tmp_path_factory):
    """(pdserve model with perturbed norms, the same weights in transformers, prompt, HF logits)."""
    lm = load_model(f"dummy:{request.param}", torch.float32, "cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lm.module.named_parameters():
            if "norm" in name or "bias" in name:  # != 1 / != 0, so a misnamed one shows up
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    out = save_hf_dir(tmp_path_factory.mktemp(request.param), lm.config, lm.module.state_dict(), lm.tokenizer)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(hf).__name__ == lm.config.architecture
    ids = torch.randint(0, lm.config.vocab_size, (PROMPT_LEN,), generator=gen)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    assert ref.std() > 1e-2
    return lm, ids, ref


def test_single_prefill_matches_transformers(pair):
    lm, ids, ref = pair
    meta, pos = make_meta([], [([5, 2, 7], 0, PROMPT_LEN)])
    assert_close(run(lm, ids, new_cache(lm), meta, pos), ref)


def test_chunked_prefill_and_decode_match_transformers(pair):
    lm, ids, ref = pair
    kv = new_cache(lm)
    a, b = [5, 2, 7], [1, 6]  # sequence A: the whole prompt; sequence B: its first 31 tokens
    # Step 1: A's first chunk.
    meta, pos = make_meta([], [(a, 0, 25)])
    assert_close(run(lm, ids[:25], kv, meta, pos), ref[:25])
    # Step 2: A's second chunk (cached prefix) and B's whole prefill in one flat batch.
    meta, pos = make_meta([], [(a, 25, 14), (b, 0, 30)])
    logits = run(lm, torch.cat([ids[25:39], ids[:30]]), kv, meta, pos)
    assert_close(logits[:14], ref[25:39])
    assert_close(logits[14:], ref[:30])
    # Step 3: one decode token each, different context lengths.
    meta, pos = make_meta([(a, 39), (b, 30)], [])
    logits = run(lm, torch.stack([ids[39], ids[30]]), kv, meta, pos)
    assert_close(logits[0], ref[39])
    assert_close(logits[1], ref[30])


def test_bf16_model_runs():
    lm = load_model("dummy:qwen3-moe-tiny", "bfloat16", "cpu")
    assert all(p.dtype == torch.bfloat16 for p in lm.module.parameters())
    meta, pos = make_meta([], [([0, 1], 0, 20)])
    hidden = lm.module(torch.arange(20), pos, new_cache(lm), meta)
    assert hidden.dtype == torch.bfloat16
    assert torch.isfinite(lm.module.compute_logits(hidden)).all()


# ---- loader / export -------------------------------------------------------------------------


def _logits(lm: LoadedModel) -> torch.Tensor:
    meta, pos = make_meta([], [([0, 1], 0, 20)])
    return run(lm, torch.arange(20) * 7 % 259, new_cache(lm), meta, pos)


@pytest.mark.parametrize("preset", PRESETS)
def test_export_roundtrip(tmp_path, preset):
    dummy = load_model(f"dummy:{preset}", torch.float32, "cpu")
    out = export_model(f"dummy:{preset}", tmp_path / "m", dtype="float32")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["architectures"] == [dummy.config.architecture]
    back = load_model(str(out), torch.float32, "cpu")
    assert back.config == dummy.config
    assert back.eos_token_ids == dummy.eos_token_ids == (258, 256)
    ref_sd = dummy.module.state_dict()
    for k, v in back.module.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    assert torch.equal(_logits(back), _logits(dummy))


def test_sharded_export_loads(tmp_path):
    out = export_model("dummy:qwen3-moe-tiny", tmp_path, dtype="bfloat16", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    # readable by another user as config.json is (safetensors' own temp file would leave 0600)
    assert {(out / s).stat().st_mode & 0o777 for s in shards} == {(out / "config.json").stat().st_mode & 0o777}
    back = load_model(str(out), torch.bfloat16, "cpu")
    dummy = load_model("dummy:qwen3-moe-tiny", torch.bfloat16, "cpu")
    assert torch.equal(_logits(back), _logits(dummy))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.num_experts == 8


def test_dummy_weights_deterministic_and_pooled(monkeypatch):
    a = load_model("dummy:qwen3-tiny", torch.float32, "cpu", seed=3).module.state_dict()
    b = load_model("dummy:qwen3-tiny", torch.float32, "cpu", seed=3).module.state_dict()
    c = load_model("dummy:qwen3-tiny", torch.float32, "cpu", seed=4).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(64))
    with torch.device("meta"):
        tied = DecoderForCausalLM(get_preset("qwen3-cpu-bench"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    # The pooled fast path for large CPU tensors: still N(0, 0.02) and deterministic.
    monkeypatch.setattr(loader, "_DIRECT_MAX", 1024)
    monkeypatch.setattr(loader, "_POOL", 4096)
    monkeypatch.setattr(loader, "_CHUNK", 256)
    p1 = load_model("dummy:qwen3-tiny", torch.float32, "cpu").module.model.embed_tokens.weight
    p2 = load_model("dummy:qwen3-tiny", torch.float32, "cpu").module.model.embed_tokens.weight
    assert torch.equal(p1, p2)
    assert abs(p1.std().item() - 0.02) < 0.002


def test_untied_checkpoint_without_lm_head_ties(tmp_path):
    lm = load_model("dummy:qwen3-moe-tiny", torch.float32, "cpu")  # untied preset
    sd = {k: v for k, v in lm.module.state_dict().items() if k != "lm_head.weight"}
    back = load_model(str(save_hf_dir(tmp_path, lm.config, sd, lm.tokenizer)), torch.float32, "cpu")
    assert back.module.lm_head.weight is back.module.model.embed_tokens.weight


# ---- tokenizer --------------------------------------------------------------------------------

TEXT = "Hello, wörld! 😀👩‍👩‍👧 中文字符 日本語 <|im_end|> tail"


def test_byte_tokenizer_roundtrip():
    tok = Tokenizer.byte_level(512)
    ids = tok.encode(TEXT)
    assert max(ids) < 259 and tok.token_to_id("<|im_end|>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == TEXT
    assert tok.decode(ids) == TEXT.replace("<|im_end|>", "")
    assert tok.eos_token_ids == (258, 256)
    assert tok.decode([300, 301]) == " ap aq"  # filler ids decode to something
    with pytest.raises(ValueError, match="259"):
        Tokenizer.byte_level(100)


def test_incremental_detokenizer_matches_full_decode():
    tok = Tokenizer.byte_level(512)
    ids = tok.encode(TEXT) + [300, 258, 301]
    for skip in (True, False):
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip, context_ids=tok.encode("prompt"))
        deltas = [det.add([i]) for i in ids]
        deltas.append(det.flush())
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == det.text == tok.decode(ids, skip_special_tokens=skip)
        assert det.token_ids == ids
    # Several ids at once, and an incomplete character only comes out on flush.
    det, ids = IncrementalDetokenizer(tok), tok.encode("ab😀")
    assert det.add(ids[:2]) == "ab"
    assert det.add(ids[2:4]) == ""
    assert det.flush() == "\ufffd"


def _metaspace_tokenizer() -> Tokenizer:
    """A sentencepiece-style BPE (Llama 2 / Mistral): spaces are '▁', the first word gets one too,
    and the decoder strips the leading space: deltas must not lose or double spaces."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, trainers

    hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    hf.train_from_iterator(["the lazy dog sleeps in the sun", "hello world again"] * 10, trainer)
    spec = json.loads(hf.to_str())  # the 256 byte tokens are ordinary vocabulary, as in Llama 2's
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    hf = HFTokenizer.from_str(json.dumps(spec))
    return Tokenizer(hf, eos_token="</s>", bos_token="<s>")


def test_incremental_detokenizer_metaspace_keeps_spaces():
    tok = _metaspace_tokenizer()
    ids = tok.encode("hello world, the lazy dog sleeps. naïve 😀 end")
    assert tok.token_to_id("<0xF0>") in ids  # the emoji went through byte fallback
    for context in ([], tok.encode("a prompt")):
        det = IncrementalDetokenizer(tok, context_ids=context)
        deltas = [det.add([i]) for i in ids] + [det.flush()]
        assert all("\ufffd" not in d for d in deltas)
        # After a prompt, the first word keeps its space (the decoder strips only a text's first one).
        whole = tok.decode(context + ids)[len(tok.decode(context)):]
        assert "".join(deltas) == whole == (" " if context else "") + tok.decode(ids)


def test_saved_tokenizer_loads_in_transformers(tmp_path):
    tok = Tokenizer.byte_level(512, model_max_length=4096)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    rendered = tok.apply_chat_template(msgs)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n"
    )
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == rendered
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT) and again.model_max_length == 4096
    assert (
        again.apply_chat_template(msgs, add_generation_prompt=False) == rendered.rsplit("<|im_start|>", 1)[0]
    )


def test_chat_template_from_config(tmp_path):
    tok = Tokenizer.byte_level(512)
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] | upper }}"}
    ]
    cfg["bos_token"] = {"content": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(tmp_path)
    assert t.apply_chat_template([{"role": "user", "content": "yo"}]) == "<|endoftext|>YO"
    assert t.bos_token_id == 256


# ---- errors -----------------------------------------------------------------------------------


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_model(str(tmp_path / "nope"), torch.float32, "cpu")
    with pytest.raises(ValueError, match="known presets: .*qwen3-tiny"):
        load_model("dummy:qwen9-huge", torch.float32, "cpu")
    with pytest.raises(ValueError, match="valid: auto, float32, bfloat16, float16"):
        resolve_dtype("float8", "cpu")
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), torch.float32, "cpu")


def _broken_dir(tmp_path: Path, edit) -> str:
    lm = load_model("dummy:qwen3-tiny", torch.float32, "cpu")
    sd = dict(lm.module.state_dict())
    out = save_hf_dir(tmp_path, lm.config, sd, lm.tokenizer)
    edit(out, sd)
    return str(out)


def test_checkpoint_errors(tmp_path):
    def wrong_arch(out, sd):
        cfg = json.loads((out / "config.json").read_text())
        cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
        (out / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        load_model(_broken_dir(tmp_path / "a", wrong_arch), torch.float32, "cpu")

    def no_weights(out, sd):
        (out / "model.safetensors").unlink()

    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(_broken_dir(tmp_path / "b", no_weights), torch.float32, "cpu")

    def missing_tensor(out, sd):
        from safetensors.torch import save_file

        del sd["model.layers.1.mlp.up_proj.weight"], sd["lm_head.weight"]
        save_file(sd, str(out / "model.safetensors"))

    with pytest.raises(ValueError, match="missing weights: model.layers.1.mlp.up_proj.weight"):
        load_model(_broken_dir(tmp_path / "c", missing_tensor), torch.float32, "cpu")

    def bad_shape(out, sd):
        from safetensors.torch import save_file

        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
        del sd["lm_head.weight"]
        save_file(sd, str(out / "model.safetensors"))

    with pytest.raises(ValueError, match=r"shape mismatch for model.layers.0.self_attn.k_proj.weight"):
        load_model(_broken_dir(tmp_path / "d", bad_shape), torch.float32, "cpu")
