"""A model's generation_config.json sets the sampling defaults (vLLM's --generation-config auto):
unit rules, the offline API, and the engine flags."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.args import add_engine_args, engine_config_from_args
from pdserve.engine.sampling_params import SamplingDefaults
from pdserve.model.export import save_hf_dir
from pdserve.model.loader import load_model

PROMPT = [(5 * j) % 250 for j in range(20)]


def test_defaults_fill_only_what_the_request_leaves_out():
    d = SamplingDefaults.from_generation_config({"temperature": 0.6, "top_k": 20, "max_new_tokens": 64})
    assert d.as_dict() == {"temperature": 0.6, "top_k": 20, "max_tokens": 64}
    assert d.fill(temperature=None, top_k=5, top_p=None) == {"temperature": 0.6, "top_k": 5, "top_p": None}
    merged = d.merged(SamplingDefaults(temperature=0.0))
    assert merged.as_dict() == {"temperature": 0.0, "top_k": 20, "max_tokens": 64}
    assert merged.params() == SamplingParams(temperature=0.0, top_k=20, max_tokens=64)
    with pytest.raises(ValueError, match="unknown generation config keys \\['do_sample'\\]"):
        SamplingDefaults.from_generation_config({"do_sample": True})
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingDefaults.from_generation_config({"top_p": 0.0})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    lm = load_model("dummy:qwen3-tiny", torch.float32, "cpu")
    out = save_hf_dir(tmp_path_factory.mktemp("gen"), lm.config, lm.module.state_dict(), lm.tokenizer)
    generation = json.loads((out / "generation_config.json").read_text())
    generation.update(temperature=0.0, max_new_tokens=5, do_sample=False)
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def test_offline_generate_uses_the_model_defaults(model_dir):
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=5)
    expected = llm.generate([PROMPT], greedy)[0].outputs[0].token_ids
    out = llm.generate([PROMPT])[0].outputs[0]
    assert len(out.token_ids) <= 5 and out.token_ids == expected[: len(out.token_ids)]
    llm.close()

    plain = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, generation_config="vllm",
                override_generation_config={"max_new_tokens": 3})
    assert plain.get_default_sampling_params() == SamplingParams(max_tokens=3)
    plain.close()
    with pytest.raises(ValueError, match="generation_config must be 'auto' or 'vllm'"):
        LLM(str(model_dir), generation_config="model")


def test_a_bad_generation_config_names_the_file(model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="generation_config.json: temperature must be non-negative"):
        load_model(str(bad), torch.float32, "cpu")


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pdserve serve", exit_on_error=False)
    add_engine_args(p)
    return p.parse_args(["dummy:qwen3-tiny", *argv])


def test_engine_flags():
    config = engine_config_from_args(_parse("--generation-config", "vllm",
                                            "--override-generation-config", '{"temperature": 0.2, "top_p": 0.9}'))
    assert config.generation_config == "vllm"
    assert config.override_generation_config == SamplingDefaults(temperature=0.2, top_p=0.9)
    assert engine_config_from_args(_parse()).generation_config == "auto"
    for bad, message in [("[1]", "expected a JSON object"), ('{"temp": 1}', "unknown generation config keys"),
                         ('{"top_k": -5}', "top_k must be")]:
        with pytest.raises(argparse.ArgumentError, match=message) as e:
            _parse("--override-generation-config", bad)
        assert "--override-generation-config" in str(e.value)
