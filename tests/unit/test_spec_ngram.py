"""The n-gram proposer and the speculative config (vLLM's keys, defaults and checks)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from pdserve.config import SpeculativeConfig
from pdserve.engine.args import add_engine_args, engine_config_from_args
from pdserve.engine.pooling_params import PoolingParams
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams, StructuredOutputs
from pdserve.engine.spec.ngram import NgramProposer, ngram_drafts
from pdserve.launch import instance_argv, plan_instances
from pdserve.launch_command import add_parser, spec_from_args


def drafts(tokens: list[int], lo: int = 1, hi: int = 4, k: int = 4) -> list[int]:
    return ngram_drafts(np.array(tokens), lo, hi, k).tolist()


def test_longest_suffix_ngram_wins_over_a_more_recent_shorter_one():
    # Suffix "1 2 3": "2 3" last occurs at 9-10 (followed by 8), "1 2 3" only at 0-2 (followed by 4 5).
    assert drafts([1, 2, 3, 4, 5, 6, 7, 9, 2, 3, 8, 1, 2, 3]) == [4, 5, 6, 7]


def test_most_recent_occurrence_among_equal_lengths():
    assert drafts([5, 6, 1, 5, 6, 2, 9, 5, 6], hi=2) == [2, 9, 5, 6]


def test_min_n_excludes_shorter_matches():
    tokens = [7, 1, 2, 9, 3, 1]  # only the 1-gram "1" occurs earlier
    assert drafts(tokens, lo=1) == [2, 9, 3, 1]
    assert drafts(tokens, lo=2) == []


def test_draft_is_cut_at_k_and_continues_a_loop_past_the_end_of_the_context():
    assert drafts([1, 2, 3, 4, 5, 6, 1, 2], k=2) == [3, 4]
    # A period-3 loop: the latest match overlaps the suffix, 3 tokens follow it, the copy goes on.
    assert drafts([9, 1, 2, 3, 1, 2, 3, 1, 2, 3], k=5) == [1, 2, 3, 1, 2]
    assert drafts([4, 7, 7], k=4) == [7, 7, 7, 7]
    assert drafts([1, 2, 3, 1, 2], hi=2, k=4) == [3, 1, 2, 3]  # the copy of "3 1 2" runs on into itself


def test_no_earlier_occurrence_no_draft():
    assert drafts([1, 2, 3, 4]) == []
    assert drafts([1]) == []
    assert drafts([1, 2, 1], k=0) == []


def request(prompt: list[int], out: list[int] | None = None, rid: str = "r", **sp) -> Request:
    r = Request(rid, prompt, SamplingParams(**{"max_tokens": 16, **sp}), max_model_len=64)
    r.output_token_ids = list(out or [])
    r.status = RequestStatus.RUNNING
    r.num_computed_tokens = r.num_tokens - 1
    return r


def test_proposer_caps_drafts_and_skips_requests_that_do_not_decode():
    cfg = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2, prompt_lookup_min=1)
    prop = NgramProposer(cfg)
    cycle = [1, 2, 3, 4, 5, 6] * 3
    r = request(cycle, [1])
    assert prop.propose([r]) == {"r": [2, 3, 4]}
    assert prop.max_drafts(request(cycle, [1] * 14)) == 1  # 2 more tokens allowed: 1 draft + the bonus
    assert prop.max_drafts(request(cycle, [1] * 15)) == 0
    assert prop.max_drafts(request(cycle * 3, [1], max_tokens=None)) == 3
    assert prop.max_drafts(request(cycle * 3, [1] * 7, max_tokens=None)) == 2  # the 64-token context is near
    grammar = request(cycle, [1], structured_outputs=StructuredOutputs(regex="[0-9]+"))
    assert prop.max_drafts(grammar) == 3  # drafts the engine then cuts where its grammar rejects one
    pooled = request(cycle, [1])
    pooled.pooling = PoolingParams()
    assert prop.max_drafts(pooled) == 0
    prefilling = request(cycle, [1])
    prefilling.num_computed_tokens = 3
    assert prop.max_drafts(prefilling) == 0
    # The cached context grows with the request's tokens.
    r.output_token_ids += [2, 3, 9]
    r.num_computed_tokens = r.num_tokens - 1
    assert prop.propose([r]) == {}  # "3 9" and "9" occur nowhere before
    r.output_token_ids += [1]
    r.num_computed_tokens += 1
    assert prop.propose([r]) == {"r": [2, 3, 9]}
    prop.forget("r")
    assert prop.propose([r]) == {"r": [2, 3, 9]}


def test_no_drafts_while_the_batch_is_as_large_as_disable_by_batch_size():
    cfg = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2, prompt_lookup_min=1, disable_by_batch_size=3)
    prop = NgramProposer(cfg)
    cycle = [1, 2, 3, 4, 5, 6] * 3
    two = [request(cycle, [1], rid=f"r{i}") for i in range(2)]
    assert prop.propose(two) == {"r0": [2, 3, 4], "r1": [2, 3, 4]}
    assert prop.propose([*two, request(cycle, [1], rid="r2")]) == {}


def test_config_follows_vllm_defaults():
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (5, 5)
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (3, 3)
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (2, 2)


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "eagle", "num_speculative_tokens": 4}, "method"),
    ({"num_speculative_tokens": 4}, "'method' is required"),
    ({"method": "ngram"}, "'num_speculative_tokens' is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_min=3 must be <= prompt_lookup_max=2"),
    ({"method": "ngram", "num_speculative_tokens": 4, "model": "x"}, "unsupported keys ['model']"),
    ({"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 1}, "disable_by_batch_size"),
])
def test_config_refuses_bad_values(values, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SpeculativeConfig.from_dict(values)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve serve")
    add_engine_args(p)
    return p


def test_cli_flag_builds_the_engine_config():
    args = parser().parse_args(["dummy:qwen3-tiny", "--speculative-config",
                                '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                                '"prompt_lookup_min": 1}'])
    assert engine_config_from_args(args).speculative == SpeculativeConfig(4, 4, 1)
    assert engine_config_from_args(parser().parse_args(["dummy:qwen3-tiny"])).speculative is None


@pytest.mark.parametrize("text", ['{"method": "ngram"}', "[1]", "not json", '{"method": "ngram", "k": 1}'])
def test_cli_errors_name_the_flag(text, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["dummy:qwen3-tiny", "--speculative-config", text])
    assert "--speculative-config" in capsys.readouterr().err


def test_up_passes_the_flag_to_every_instance():
    flag = '{"method": "ngram", "num_speculative_tokens": 3}'
    up = argparse.ArgumentParser()
    add_parser(up.add_subparsers())
    spec = spec_from_args(up.parse_args(["up", "disagg", "dummy:qwen3-tiny", "--cpu-map", "0;1",
                                         "--engine-args", f"--speculative-config '{flag}'"]))
    for plan in plan_instances(spec, (0, 1)):  # the prefill instance ignores it (it never speculates)
        argv = instance_argv(spec, plan, 8100, "127.0.0.1:5555")
        assert argv[-2:] == ["--speculative-config", flag]
        config = engine_config_from_args(parser().parse_args(["dummy:qwen3-tiny", *argv[-2:]]))
        assert config.speculative == SpeculativeConfig(3)
