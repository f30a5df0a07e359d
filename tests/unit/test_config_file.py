"""vLLM's `--config FILE` on `serve`, `proxy` and `up`: YAML keys are long flags (underscores or
dashes), values as on the command line, lists for flags taking several; the command line wins;
an unknown key, a bad value or a bad file is a usage error naming the key and the file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.cli import build_parser, main
from pdserve.config_file import expand_config_file
from pdserve.launch_command import spec_from_args
from pdserve.proxy.command import settings_from_args as proxy_settings
from pdserve.server.command import settings_from_args as server_settings


def parse(tmp_path: Path, yaml: str, *argv: str) -> argparse.Namespace:
    path = tmp_path / "config.yaml"
    path.write_text(yaml)
    parser = build_parser()
    expanded = [a.replace("FILE", str(path)) for a in argv]
    return parser.parse_args(expand_config_file(parser, expanded))


def test_serve_from_a_file(tmp_path: Path) -> None:
    args = parse(tmp_path, """
model: dummy:qwen3-tiny
port: 8001
max_num_seqs: 7              # underscores
max-num-batched-tokens: 512  # or dashes
served-model-name: [a, b]    # nargs: a list
enable-prefix-caching: false # BooleanOptionalAction: --no-enable-prefix-caching
no-access-log: true          # store_true
enforce-eager: false         # store_true, false: not given
override-generation-config: {temperature: 0.5}   # a JSON flag: the mapping as JSON
allowed-origins: ["https://a.example"]             # a JSON list flag: the list as JSON
kv-transfer-config: {kv_connector: PdserveConnector, kv_role: kv_both}
""", "serve", "--config", "FILE")
    assert (args.model, args.port, args.max_num_seqs, args.max_num_batched_tokens) == ("dummy:qwen3-tiny", 8001, 7, 512)
    assert args.served_model_name == ["a", "b"] and args.enable_prefix_caching is False
    assert args.no_access_log and not args.enforce_eager
    assert args.override_generation_config.temperature == 0.5
    s = server_settings(args)
    assert s.frontend.cors.allowed_origins == ("https://a.example",) and not s.frontend.access_log
    assert args.kv_transfer_config is not None


def test_the_command_line_wins(tmp_path: Path) -> None:
    yaml = "model: dummy:from-file\nport: 8001\nserved-model-name: [a, b]\nenable-prefix-caching: false\n"
    args = parse(tmp_path, yaml, "serve", "dummy:qwen3-tiny", "--config=FILE", "--port", "9000",
                 "--served-model-name", "c", "--enable-prefix-caching")
    assert (args.model, args.port, args.served_model_name, args.enable_prefix_caching) == (
        "dummy:qwen3-tiny", 9000, ["c"], True)
    # an `extend` list (proxy --prefill) is replaced, not merged
    args = parse(tmp_path, "prefill: [a:1, b:2]\ndecode: c:3\nregistry-port: 0\n", "proxy", "--config", "FILE",
                 "--prefill", "d:4")
    s = proxy_settings(args)
    assert (s.prefill, s.decode, s.registry_port) == (("d:4",), ("c:3",), 0)
    # `up`: positionals from the command line and the file; of two exclusive flags the command line's
    args = parse(tmp_path, "model: dummy:qwen3-tiny\ncpu-map: '0;1'\nprefill: 2\nallowed-origins: ['https://a']\n",
                 "up", "disagg", "--config", "FILE", "--cpus-per-instance", "1")
    spec = spec_from_args(args)
    assert (spec.kind, spec.model, spec.prefill, spec.cpu_map, spec.cpus_per_instance) == (
        "disagg", "dummy:qwen3-tiny", 2, None, 1)
    assert spec.proxy_args[:2] == ("--allowed-origins", '["https://a"]')


@pytest.mark.parametrize(("yaml", "message"), [
    ("model: m\nmax_num_seq: 3\n", "unknown key 'max_num_seq' in --config {path}: `pdserve serve` has no flag "
                                   "--max-num-seq"),
    ("model: m\nno-access-log: 1\n", "--config {path}: key 'no-access-log' is a flag: expected true or false"),
    ("model: m\nport: null\n", "--config {path}: key 'port' has no value"),
    ("model: m\nport: nine\n", "argument --port: expected a port (0-65535) integer, got 'nine'"),
    ("- model\n- m\n", "--config {path}: expected a mapping of flag names to values, got a list"),
    ("model: [unclosed\n", "--config {path}: not valid YAML"),
    ("config: other.yaml\n", "--config {path}: a config file cannot name another one"),
])
def test_bad_files_name_the_key_and_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml: str,
                                             message: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse(tmp_path, yaml, "serve", "--config", "FILE")
    assert e.value.code == 2
    assert message.format(path=tmp_path / "config.yaml") in capsys.readouterr().err


def test_a_missing_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["proxy", "--config", str(tmp_path / "nope.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {tmp_path / 'nope.yaml'}: cannot read it" in err and "usage: pdserve proxy" in err


def test_no_config_leaves_the_command_line_alone() -> None:
    parser = build_parser()
    argv = ["serve", "dummy:qwen3-tiny", "--port", "-1"]
    assert expand_config_file(parser, argv) == argv
    assert expand_config_file(parser, ["bench", "--base-url", "http://h:1"]) == ["bench", "--base-url", "http://h:1"]
