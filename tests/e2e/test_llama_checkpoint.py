"""A Llama-3-shaped checkpoint written by transformers (llama3 RoPE scaling, a trained byte-level BPE
tokenizer whose post-processor adds <|begin_of_text|>, a header-style chat template) served by a real
`pdserve serve`: greedy text equals transformers' `generate`, BOS handling follows vLLM (completions
add it, chat templates write it once), streamed text equals the non-streamed one."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tests.e2e.conftest import ServerProcess, pdserve_server

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = (
    "{{- bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Disaggregated serving splits prefill and decode.",
          "Hello, world! How are you today?", "pdserve moves the KV cache between instances."] * 20


def _tokenizer(out: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": TEMPLATE, "clean_up_tokenization_spaces": False,
    }))
    return tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Tokenizer, torch.nn.Module]:
    out = tmp_path_factory.mktemp("llama3")
    tok = _tokenizer(out)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=[1, 4],
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.save_pretrained(out)
    return out, tok, hf


@pytest.fixture(scope="module")
def server(checkpoint, module_tmp: Path):
    with pdserve_server(module_tmp, "--dtype", "float32", model=str(checkpoint[0])) as s:
        yield s


def _tokenize(server: ServerProcess, **body) -> list[int]:
    r = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=30)
    r.raise_for_status()
    return r.json()["tokens"]


def test_bos_added_once(server: ServerProcess, checkpoint) -> None:
    _, tok, _ = checkpoint
    bos = tok.token_to_id("<|begin_of_text|>")
    text = "The quick brown fox"
    with_bos = _tokenize(server, prompt=text)
    assert with_bos == tok.encode(text).ids and with_bos[0] == bos
    assert _tokenize(server, prompt=text, add_special_tokens=False) == with_bos[1:]
    chat = _tokenize(server, messages=[{"role": "user", "content": "Hello"}])
    assert chat[0] == bos and chat.count(bos) == 1

    client = openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)
    usage = client.completions.create(model=str(checkpoint[0]), prompt=text, max_tokens=1).usage
    assert usage.prompt_tokens == len(with_bos)
    bare = client.completions.create(model=str(checkpoint[0]), prompt=text, max_tokens=1,
                                     extra_body={"add_special_tokens": False}).usage
    assert bare.prompt_tokens == len(with_bos) - 1


def test_greedy_text_equals_transformers_generate(server: ServerProcess, checkpoint) -> None:
    path, tok, hf = checkpoint
    prompt = "Disaggregated serving splits"
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1]:].tolist()
    client = openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)
    out = client.completions.create(model=str(path), prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert out.choices[0].text == tok.decode(ref, skip_special_tokens=False)


def test_streamed_chat_equals_non_streamed(server: ServerProcess, checkpoint) -> None:
    client = openai.OpenAI(base_url=server.v1_url, api_key="unused", max_retries=0)
    kw = dict(model=str(checkpoint[0]), messages=[{"role": "user", "content": "How are you today?"}],
              max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert whole and "".join(parts) == whole
