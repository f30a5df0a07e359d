"""`pdserve bench --dataset-name sharegpt|custom`: the file loaders, vLLM's sampling and length
filters, prompt streams, chat text for random prompts, the flags' errors, and whole runs against
the fake server (its /tokenize) or a local tokenizer directory."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from pdserve.bench.command import add_parser, config_from_args
from pdserve.bench.datasets import DatasetEntry, DatasetError, load_dataset
from pdserve.bench.prompts import build_requests, is_valid_sequence
from pdserve.bench.runner import BenchConfig, run_benchmark
from pdserve.bench.tokenizer import LocalTokenizer
from pdserve.bench.workload import BenchRequest, WorkloadConfig
from tests.unit.test_bench_client import FakeServer, fake_encode, fake_render

BOS = 1000


class ByteTokenizer:
    """UTF-8 bytes, a BOS id with special tokens, `fake_render` as the chat template."""

    tokenizer_id = "bytes"

    def __init__(self) -> None:
        self.encoded = 0

    async def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        self.encoded += len(texts)
        return [[BOS] * add_special_tokens + fake_encode(t) for t in texts]

    async def encode_chat(self, contents: Sequence[str]) -> list[list[int]]:
        return [fake_encode(fake_render(c)) for c in contents]

    async def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [bytes(t for t in s if t < 256).decode(errors="replace") for s in ids]


def conv(prompt: str, reply: str, *more: str) -> dict[str, object]:
    turns = [("human", prompt), ("gpt", reply), *(("human", m) for m in more)]
    return {"id": prompt[:8], "conversations": [{"from": f, "value": v} for f, v in turns]}


def write_sharegpt(tmp_path: Path, entries: list[object], name: str = "sg.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return str(path)


def write_custom(tmp_path: Path, lines: list[str], name: str = "c.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def words(n: int, tag: str = "w") -> list[dict[str, object]]:
    """`n` valid conversations with distinct prompts."""
    return [conv(f"{tag} prompt number {i:04d}", f"the reply to {i:04d}") for i in range(n)]


def build(
    w: WorkloadConfig, chat: bool = False, stream: int = 0, count: int | None = None, tok: ByteTokenizer | None = None
) -> list[BenchRequest]:
    return asyncio.run(build_requests(w, tok or ByteTokenizer(), chat, stream=stream, count=count))


def sharegpt(path: str, n: int, **kw: object) -> WorkloadConfig:
    return WorkloadConfig(num_prompts=n, dataset_name="sharegpt", dataset_path=path, **kw)  # type: ignore[arg-type]


# --- loaders ---------------------------------------------------------------------------------


def test_sharegpt_loader_keeps_the_first_two_turns_of_entries_with_two(tmp_path: Path) -> None:
    path = write_sharegpt(tmp_path, [
        conv("hello there", "hi!", "and then?"),
        {"id": "one turn", "conversations": [{"from": "human", "value": "alone"}]},
        {"id": "no conversations"},
        "not an object",
        conv("second", "reply"),
    ])  # fmt: skip
    ds = load_dataset("sharegpt", path)
    assert ds.entries == (DatasetEntry("hello there", "hi!"), DatasetEntry("second", "reply"))
    assert (ds.name, ds.path) == ("sharegpt", path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON (line 1"),
        ('{"conversations": []}', "a JSON list of conversations, not a dict"),
        (
            '[{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}]',
            'entry 0: conversations[0] has no string "value"',
        ),
        ('[{"conversations": [{"from": "human", "value": "x"}, "gpt"]}]', "conversations[1]"),
        ('[{"conversations": [{"from": "human", "value": "only"}]}]', "no conversation with at least two turns"),
        ("[]", "no conversation with at least two turns"),
    ],
)
def test_bad_sharegpt_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DatasetError, match="^argument --dataset-path: ") as info:
        load_dataset("sharegpt", str(tmp_path / "bad.json"))
    assert message in str(info.value)


def test_custom_loader(tmp_path: Path) -> None:
    path = write_custom(
        tmp_path, ['{"prompt": "What is the capital of India?"}', "", '{"prompt": "Ünïcode", "other": 1}']
    )
    assert load_dataset("custom", path).entries == (
        DatasetEntry("What is the capital of India?"),
        DatasetEntry("Ünïcode"),
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ok"}', "{oops"], "line 2: not JSON"),
        (['{"text": "no prompt"}'], 'line 1: expected an object with a string "prompt"'),
        (['["prompt"]'], "line 1: expected an object"),
        (['{"prompt": 5}'], "line 1: expected an object"),
        ([""], "no prompt"),
    ],
)
def test_bad_custom_files(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(DatasetError, match="^argument --dataset-path: ") as info:
        load_dataset("custom", write_custom(tmp_path, lines))
    assert message in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset("sharegpt", str(tmp_path / "missing.json"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset("custom", str(tmp_path / "latin1.jsonl"))


def test_a_file_is_read_once_until_it_changes(tmp_path: Path) -> None:
    path = write_sharegpt(tmp_path, words(3))
    first = load_dataset("sharegpt", path)
    assert load_dataset("sharegpt", path) is first
    write_sharegpt(tmp_path, words(4))
    assert len(load_dataset("sharegpt", path).entries) == 4


# --- sampling --------------------------------------------------------------------------------


def test_vllm_length_filter() -> None:
    assert is_valid_sequence(4, 4, False) and not is_valid_sequence(3, 4, False)
    assert not is_valid_sequence(4, 3, False) and is_valid_sequence(4, 3, True)  # fixed output: unchecked
    assert is_valid_sequence(1024, 1024, False) and not is_valid_sequence(1025, 4, False)
    assert not is_valid_sequence(1000, 1049, False) and is_valid_sequence(1000, 1048, False)
    assert not is_valid_sequence(1000, 1049, True)  # the total is checked with a fixed length too


def test_sharegpt_filters_on_token_counts_with_special_tokens(tmp_path: Path) -> None:
    # The byte tokenizer adds a BOS: a text of k bytes is k + 1 tokens.
    entries = [
        conv("ab", "reply"),  # prompt 3 tokens: too short
        conv("abc", "xyz"),  # 4 and 4: kept
        conv("abcd", "xy"),  # reply 3 tokens: too short
        conv("p" * 1023, "r" * 1023),  # 1024 + 1024: kept
        conv("p" * 1024, "rrrr"),  # prompt 1025: too long
        conv("q" * 999, "r" * 1048),  # 1000 + 1049 > 2048: dropped
    ]
    path = write_sharegpt(tmp_path, entries)
    reqs = build(sharegpt(path, 2, disable_shuffle=True))
    assert [(r.prompt_text, r.prompt_len, r.output_len) for r in reqs] == [("abc", 4, 4), ("p" * 1023, 1024, 1024)]
    assert all(r.prompt_token_ids[0] == BOS and not r.ignore_eos for r in reqs)
    # A fixed output length (--sharegpt-output-len) lifts the reply's minimum, not the others.
    fixed = build(sharegpt(path, 3, disable_shuffle=True, sharegpt_output_len=2, ignore_eos=True))
    assert [r.prompt_text[:4] for r in fixed] == ["abc", "abcd", "pppp"]
    assert all(r.output_len == 2 and r.ignore_eos for r in fixed)


def test_sample_is_vllms_seeded_shuffle_and_deterministic(tmp_path: Path) -> None:
    data = words(40)
    path = write_sharegpt(tmp_path, data)
    prompts = lambda seed: [r.prompt_text for r in build(sharegpt(path, 10, seed=seed))]  # noqa: E731
    order = [e["conversations"][0]["value"] for e in data]  # type: ignore[index]
    random.seed(7)  # what vLLM's ShareGPTDataset does with --seed 7
    random.shuffle(order)
    assert prompts(7) == order[:10] == prompts(7)
    assert prompts(8) != prompts(7)
    unshuffled = [r.prompt_text for r in build(sharegpt(path, 3, disable_shuffle=True))]
    assert unshuffled == [f"w prompt number {i:04d}" for i in range(3)]


def test_streams_take_disjoint_samples_and_warmups_their_own(tmp_path: Path) -> None:
    path = write_sharegpt(tmp_path, words(200))
    w = sharegpt(path, 10)
    tok = ByteTokenizer()
    streams = [[r.prompt_text for r in build(w, stream=s, tok=tok)] for s in (0, 2, 3)]
    warm = [r.prompt_text for r in build(w, stream=1, count=4)]
    every = [p for s in streams for p in s] + warm
    assert len(set(every)) == len(every) == 34
    assert tok.encoded == 3 * 2 * 64  # prompt and reply of one batch of 64 entries each: not the whole file
    assert [r.index for r in build(w, stream=1, count=4)] == [0, 1, 2, 3]


def test_a_small_file_repeats_in_order(tmp_path: Path) -> None:
    path = write_sharegpt(tmp_path, words(3) + [conv("no", "too short")])
    reqs = build(sharegpt(path, 7, disable_shuffle=True))
    assert [r.prompt_text for r in reqs] == [f"w prompt number {i:04d}" for i in (0, 1, 2, 0, 1, 2, 0)]
    assert [r.prompt_text for r in build(sharegpt(path, 2, disable_shuffle=True), stream=1)] == [
        "w prompt number 0002",
        "w prompt number 0000",
    ]  # from position 2 on, wrapping round


def test_no_usable_conversation_is_a_dataset_error(tmp_path: Path) -> None:
    path = write_sharegpt(tmp_path, [conv("a", "b"), conv("cc", "dd")])
    with pytest.raises(DatasetError, match="argument --dataset-path: no conversation .* passes vLLM's length"):
        build(sharegpt(path, 2))


def test_lora_adapters_drawn_for_dataset_requests(tmp_path: Path) -> None:
    path = write_sharegpt(tmp_path, words(20))
    reqs = build(sharegpt(path, 20, lora_modules=("a", "b")))
    assert {r.model for r in reqs} == {"a", "b"}


def test_custom_prompts_rendered_for_completions_bare_for_chat(tmp_path: Path) -> None:
    path = write_custom(tmp_path, [json.dumps({"prompt": f"question {i}"}) for i in range(5)])
    w = WorkloadConfig(
        num_prompts=3, dataset_name="custom", dataset_path=path, custom_output_len=7, disable_shuffle=True
    )
    # completions (vLLM's default): the chat-template rendering, sent as its token ids
    reqs = build(w)
    assert [r.prompt_text for r in reqs] == [None, None, None]
    assert reqs[0].prompt_token_ids == tuple(fake_encode(fake_render("question 0")))
    assert all(r.output_len == 7 and not r.ignore_eos for r in reqs)
    # --skip-chat-template: the bare text, counted as a completions prompt (with the BOS)
    bare = build(WorkloadConfig(**{**w.__dict__, "skip_chat_template": True}))
    assert bare[1].prompt_text == "question 1" and bare[1].prompt_len == len("question 1") + 1
    # chat: the bare text; its length is the rendered prompt's, what the server prefills
    chat = build(w, chat=True)
    assert chat[2].prompt_text == "question 2" and chat[2].prompt_len == len(fake_render("question 2"))
    shuffled = [r.prompt_text for r in build(WorkloadConfig(**{**w.__dict__, "disable_shuffle": False}), chat=True)]
    order = [f"question {i}" for i in range(5)]
    random.Random(0).shuffle(order)
    assert shuffled == order[:3]


def test_random_prompts_become_text_of_their_length_for_chat() -> None:
    w = WorkloadConfig(num_prompts=4, input_len=24, output_len=3, vocab_range=(32, 127))
    ids_only = build(w)  # completions: ids, no tokenizer involved
    assert all(r.prompt_text is None for r in ids_only)
    chat = build(w, chat=True)
    for plain, r in zip(ids_only, chat, strict=True):
        assert r.prompt_text is not None and r.prompt_token_ids == plain.prompt_token_ids  # ASCII round-trips
        assert r.prompt_text.encode() == bytes(plain.prompt_token_ids) and r.ignore_eos
    # Bytes that are not UTF-8 decode to U+FFFD (3 bytes): cut and topped up until the text fits.
    wide = build(WorkloadConfig(num_prompts=6, input_len=40, output_len=3), chat=True)
    for r in wide:
        assert r.prompt_text is not None and list(r.prompt_token_ids) == fake_encode(r.prompt_text)
        assert abs(r.prompt_len - 40) <= 2


def test_a_dataset_needs_a_tokenizer(tmp_path: Path) -> None:
    path = write_sharegpt(tmp_path, words(2))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        asyncio.run(build_requests(sharegpt(path, 1), None, False))


def test_workload_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset_path is required"):
        WorkloadConfig(dataset_name="sharegpt")
    with pytest.raises(ValueError, match="refused by random"):
        WorkloadConfig(dataset_path="x.json")
    with pytest.raises(ValueError, match="dataset_name must be one of"):
        WorkloadConfig(dataset_name="sonnet", dataset_path="x")  # type: ignore[arg-type]
    w = sharegpt("sg.json", 3)
    assert w.fixed_output_len is None and w.describe() == "ShareGPT file sg.json, the replies' output lengths"
    assert WorkloadConfig(input_len=8, output_len=2).describe() == "8 input / 2 output tokens"


# --- a local tokenizer directory (--tokenizer) ------------------------------------------------


def tokenizer_dir(tmp_path: Path) -> str:
    from pdserve.model.tokenizer import Tokenizer

    Tokenizer.byte_level(300).save(tmp_path / "tok")
    return str(tmp_path / "tok")


def test_local_tokenizer(tmp_path: Path) -> None:
    tok = LocalTokenizer(tokenizer_dir(tmp_path))
    assert asyncio.run(tok.encode(["hé"], add_special_tokens=True)) == [[104, 195, 169]]
    [chat] = asyncio.run(tok.encode_chat(["hi"]))
    assert asyncio.run(tok.decode([chat])) == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        LocalTokenizer(str(tmp_path))


# --- the command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _config(*argv: str) -> BenchConfig:
    return config_from_args(_parser().parse_args(["bench", "--base-url", "http://h:1", *argv]))


def test_dataset_and_endpoint_flags_map_to_config(tmp_path: Path) -> None:
    sg = write_sharegpt(tmp_path, words(3))
    cfg = _config(
        "--dataset-name",
        "sharegpt",
        "--dataset-path",
        sg,
        "--backend",
        "openai-chat",
        "--seed",
        "4",
        "--ignore-eos",
        "--disable-shuffle",
        "--tokenizer",
        tokenizer_dir(tmp_path),
    )
    w = cfg.workload
    assert (cfg.endpoint_type, cfg.path, cfg.url) == ("chat", "/v1/chat/completions", "http://h:1/v1/chat/completions")
    assert (w.dataset_name, w.dataset_path, w.sharegpt_output_len, w.ignore_eos, w.disable_shuffle, w.seed) == (
        "sharegpt",
        sg,
        None,
        True,
        True,
        4,
    )
    assert cfg.tokenizer == str(tmp_path / "tok")
    # vLLM: --output-len sets a dataset's output length
    with_len = _config("--dataset-name", "sharegpt", "--dataset-path", sg, "--output-len", "9")
    assert with_len.workload.sharegpt_output_len == 9
    assert (
        _config(
            "--dataset-name", "sharegpt", "--dataset-path", sg, "--sharegpt-output-len", "5"
        ).workload.fixed_output_len
        == 5
    )
    c = write_custom(tmp_path, ['{"prompt": "x"}'])
    custom = _config("--dataset-name", "custom", "--dataset-path", c, "--skip-chat-template").workload
    assert (custom.custom_output_len, custom.skip_chat_template) == (256, True)
    assert _config("--endpoint-type", "chat").endpoint_type == "chat"
    assert _config("--endpoint-type", "openai").endpoint_type == "completions"


@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["--dataset-name", "sonnet"], "--dataset-name", "invalid choice"),
        (["--endpoint-type", "responses"], "--endpoint-type/--backend", "invalid choice"),
        (["--backend", "vllm-pooling"], "--endpoint-type/--backend", "invalid choice"),
        (["--sharegpt-output-len", "0"], "--sharegpt-output-len", "must be in"),
    ],
)
def test_bad_flag_values(argv: list[str], flag: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _config(*argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}" in err and message in err


@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["--dataset-name", "sharegpt", "--dataset-path", "{bad}"], "--dataset-path", "is not JSON"),
        (["--dataset-name", "custom", "--dataset-path", "{missing}"], "--dataset-path", "cannot read"),
        (["--dataset-name", "sharegpt"], "--dataset-path", "needs a file"),
        (["--dataset-path", "{good}"], "--dataset-path", "random dataset takes no file"),
        (
            ["--dataset-name", "sharegpt", "--dataset-path", "{good}", "--input-len", "5"],
            "--input-len/--random-input-len",
            "only for --dataset-name random",
        ),
        (
            ["--dataset-name", "sharegpt", "--dataset-path", "{good}", "--random-prefix-len", "5"],
            "--random-prefix-len",
            "only for --dataset-name random",
        ),
        (
            ["--dataset-name", "sharegpt", "--dataset-path", "{good}", "--custom-output-len", "5"],
            "--custom-output-len",
            "only for --dataset-name custom",
        ),
        (["--sharegpt-output-len", "5"], "--sharegpt-output-len", "only for --dataset-name sharegpt"),
        (["--tokenizer", "{missing}"], "--tokenizer", "no tokenizer.json"),
        (["--endpoint-type", "chat", "--endpoint", "/v1/completions"], "--endpoint", "does not take"),
        (["--endpoint", "/v1/chat/completions"], "--endpoint", "does not take --endpoint-type completions"),
    ],
)
def test_flag_errors_name_the_flag(
    tmp_path: Path, argv: list[str], flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.json").write_text("{bad")
    files = {
        "{bad}": str(tmp_path / "bad.json"),
        "{missing}": str(tmp_path / "missing"),
        "{good}": write_sharegpt(tmp_path, words(2)),
    }
    with pytest.raises(SystemExit) as info:
        _config(*(files.get(a, a) for a in argv))
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: " in err and message in err, err


def test_sweep_takes_the_workload_flags(tmp_path: Path) -> None:
    from pdserve.bench import sweep_command

    parser = argparse.ArgumentParser()
    sweep_command.add_parser(parser.add_subparsers())
    sg = write_sharegpt(tmp_path, words(3))
    args = parser.parse_args(
        [
            "sweep",
            "dummy:m",
            "--dataset-name",
            "sharegpt",
            "--dataset-path",
            sg,
            "--endpoint-type",
            "chat",
            "--sharegpt-output-len",
            "8",
        ]
    )
    cfg = sweep_command.config_from_sweep_args(args)
    assert (cfg.bench.endpoint_type, cfg.bench.workload.dataset_path, cfg.bench.workload.fixed_output_len) == (
        "chat",
        sg,
        8,
    )
    (tmp_path / "bad.json").write_text("[1, 2]")
    bad = parser.parse_args(
        ["sweep", "dummy:m", "--dataset-name", "sharegpt", "--dataset-path", str(tmp_path / "bad.json")]
    )
    with pytest.raises(ValueError, match="^argument --dataset-path: .*no conversation"):
        sweep_command.config_from_sweep_args(bad)


# --- whole runs against the fake server --------------------------------------------------------


def test_sharegpt_chat_run_against_the_fake_server(tmp_path: Path) -> None:
    path = write_sharegpt(tmp_path, words(12))
    w = sharegpt(path, 5, ignore_eos=True)
    with FakeServer() as server:
        cfg = BenchConfig(base_url=server.base_url, endpoint_type="chat", workload=w, warmup=2, request_rate=500.0)
        res = asyncio.run(run_benchmark(cfg))
        calls = server.tokenize_calls
        payloads = server.payloads
    expected = build(w, chat=True)
    assert res.metrics.completed == 5 and res.tokenizer_id == f"{server.base_url}/tokenize"
    assert calls > 0
    sent = [p["messages"][0]["content"] for p in payloads]  # type: ignore[index]
    assert sorted(sent[2:]) == sorted(r.prompt_text or "" for r in expected)  # the warm-up's first, awaited
    assert not set(sent[:2]) & set(sent[2:])
    # the fake /tokenize adds no special token: a reply's length is its bytes
    assert all(p["max_completion_tokens"] == len("the reply to 0000") and p["ignore_eos"] for p in payloads)
    rec = res.records[0]
    assert rec.prompt_len == len(fake_render(sent[2])) and rec.output_tokens == rec.expected_output_len == 17


def test_custom_completions_run_with_a_local_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_custom(tmp_path, ['{"prompt": "one"}', '{"prompt": "two"}'])
    tok_dir = tokenizer_dir(tmp_path)
    with FakeServer() as server:
        args = _parser().parse_args(
            [
                "bench",
                "--base-url",
                server.base_url,
                "--dataset-name",
                "custom",
                "--dataset-path",
                path,
                "--custom-output-len",
                "3",
                "--num-prompts",
                "4",
                "--tokenizer",
                tok_dir,
                "--save-result",
                str(tmp_path / "r.json"),
                "--no-progress",
            ]
        )
        assert args.func(args) == 0
        assert server.tokenize_calls == 0
        prompts = [p["prompt"] for p in server.payloads]
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["dataset_name"], data["dataset_path"], data["endpoint_type"]) == ("custom", path, "openai")
    assert data["completed"] == 4 and data["total_output_tokens"] == 12
    assert data["tokenizer_id"] == str(tmp_path / "tok")
    # the ChatML rendering of each prompt, sent as its token ids
    texts = asyncio.run(LocalTokenizer(tok_dir).decode(prompts))  # type: ignore[arg-type]
    assert set(texts) == {f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in ("one", "two")}
    assert "Dataset:                                 custom" in capsys.readouterr().out


def test_a_file_nothing_passes_is_exit_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sharegpt(tmp_path, [conv("a", "b")])
    with FakeServer() as server:
        args = _parser().parse_args(
            [
                "bench",
                "--base-url",
                server.base_url,
                "--dataset-name",
                "sharegpt",
                "--dataset-path",
                path,
                "--no-progress",
            ]
        )
        assert args.func(args) == 2
        assert server.payloads == []
    assert "pdserve bench: error: argument --dataset-path: no conversation" in capsys.readouterr().err


def test_server_without_tokenize_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sharegpt(tmp_path, words(3))
    with FakeServer() as server:
        args = _parser().parse_args(
            [
                "bench",
                "--base-url",
                server.base_url + "/nothing",
                "--model",
                "ok",
                "--dataset-name",
                "sharegpt",
                "--dataset-path",
                path,
                "--no-progress",
            ]
        )
        assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "/nothing/tokenize -> HTTP 404" in err and "--tokenizer PATH" in err


def test_a_sweep_sends_each_rate_its_own_conversations(tmp_path: Path) -> None:
    from pdserve.bench.sweep import SweepConfig, run_rates

    path = write_sharegpt(tmp_path, words(40))
    bench = BenchConfig(base_url="", endpoint_type="chat", workload=sharegpt(path, 6), timeout_s=30)
    cfg = SweepConfig(model="", bench=bench, rates=(200.0, 400.0), topologies=("fake",), warmup=2)
    with FakeServer() as server:
        points, error = run_rates(cfg, "fake", server.base_url, log=lambda _msg: None)
        sent = [p["messages"][0]["content"] for p in server.payloads]  # type: ignore[index]
    assert error is None and [p.result.metrics.completed for p in points if p.result] == [6, 6]
    assert len(sent) == 2 + 2 * 6 and len(set(sent)) == len(sent)  # warm-up and every rate: their own prompts
