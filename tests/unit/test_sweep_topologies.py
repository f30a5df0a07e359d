"""Topology names and the core/GPU split `pdserve up` and `pdserve sweep` start from (no processes)."""

from __future__ import annotations

import argparse

import pytest

from pdserve.launch import TopologySpec, instance_argv, parse_topology, plan_instances, proxy_argv
from pdserve.launch_command import add_parser, spec_from_args


def test_topology_names() -> None:
    s1, s2 = parse_topology("standard:1", "m"), parse_topology("standard:2", "m")
    assert (s1.kind, s1.instances, s1.roles) == ("standard", 1, ("standalone",))
    assert s2.roles == ("standalone", "standalone") and s2.label == "standard:2"
    r, w = parse_topology("disagg-read", "m"), parse_topology("disagg-write", "m")
    assert (r.kind, r.kv_mode, r.roles) == ("disagg", "read", ("prefill", "decode"))
    assert w.kv_mode == "write" and w.label == "disagg-write"
    x = parse_topology("disagg-write:2p1d", "m", port=9)
    assert x.roles == ("prefill", "prefill", "decode") and x.port == 9
    assert TopologySpec("disagg", "m", prefill=2, decode=3, kv_mode="read").label == "disagg-read:2p3d"


@pytest.mark.parametrize("bad", ["standard:x", "disagg-write:2x", "collocated", "disagg-read:p1d", "standard:0"])
def test_bad_topology_names(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_topology(bad, "m")


def cores(spec: TopologySpec, avail: tuple[int, ...] = (0, 1)) -> list[tuple[int, ...]]:
    return [p.cpus for p in plan_instances(spec, avail)]


def test_cores_divided_evenly_at_least_one_each() -> None:
    assert cores(parse_topology("standard:1", "m")) == [(0, 1)]  # one instance on all cores
    assert cores(parse_topology("standard:2", "m")) == [(0,), (1,)]
    assert cores(parse_topology("disagg-read", "m")) == [(0,), (1,)]  # prefill first
    assert cores(parse_topology("standard:2", "m"), (0, 1, 2, 3, 4)) == [(0, 1), (2, 3)]  # core 4 left free
    assert cores(parse_topology("standard:3", "m")) == [(0,), (1,), (0,)]  # more instances than cores: shared
    names = [p.name for p in plan_instances(parse_topology("disagg-write:2p1d", "m"), (0, 1, 2))]
    assert names == ["prefill-0", "prefill-1", "decode-0"]


def test_explicit_core_split() -> None:
    assert cores(TopologySpec("standard", "m", instances=2, cpus_per_instance=2), (0, 1, 2, 3)) == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="need 4 cores"):
        cores(TopologySpec("standard", "m", instances=2, cpus_per_instance=2))
    assert cores(TopologySpec("disagg", "m", cpu_map=((1,), (0,)))) == [(1,), (0,)]
    with pytest.raises(ValueError, match="2 instances"):
        cores(TopologySpec("disagg", "m", cpu_map=((0,),)))


def test_gpus_split() -> None:
    plans = plan_instances(TopologySpec("disagg", "m", gpus=(0, 1, 2, 3)), (0, 1))
    assert [p.gpus for p in plans] == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="GPUs"):
        plan_instances(TopologySpec("standard", "m", instances=3, gpus=(0, 1)), (0, 1))


def test_command_lines() -> None:
    spec = TopologySpec("disagg", "dummy:m", kv_mode="read", engine_args=("--threads", "3"), proxy_args=("--x",))
    plan = plan_instances(spec, (0, 1, 2, 3))[1]
    argv = instance_argv(spec, plan, 8100, "127.0.0.1:5555")
    text = " ".join(argv)
    assert "serve dummy:m" in text and "--role decode" in text and "--kv-mode read" in text
    assert "--cpus 2,3" in text and "--proxy-address 127.0.0.1:5555" in text and "--port 8100" in text
    assert argv[-2:] == ["--threads", "3"]  # engine args last: they win over the launcher's --threads 2
    standalone = instance_argv(TopologySpec("standard", "m", gpus=(0,)), plan_instances(
        TopologySpec("standard", "m", gpus=(0,)), (0,))[0], 1, "h:2")
    assert "--kv-mode" not in standalone and "--device" in standalone
    p = " ".join(proxy_argv(spec, 8000, 5555))
    assert "proxy" in p and "--mode disagg" in p and "--kv-mode read" in p and "--registry-port 5555" in p
    assert p.endswith("--x")
    assert "--kv-mode" not in proxy_argv(TopologySpec("standard", "m"), 1, 2)


def test_up_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["up", "disagg", "dummy:m", "--kv-mode", "read", "--cpu-map", "0-1;2",
                              "--engine-args", "--num-kv-blocks 64", "--port", "0", "--run-dir", "d"])
    spec = spec_from_args(args)
    assert spec.cpu_map == ((0, 1), (2,)) and spec.kv_mode == "read" and spec.port == 0
    assert spec.engine_args == ("--num-kv-blocks", "64") and spec.run_dir == "d"
    with pytest.raises(SystemExit):  # one way to split cores at a time
        parser.parse_args(["up", "standard", "m", "--cpu-map", "0", "--cpus-per-instance", "1"])


def test_up_passes_chat_template_flags_to_every_instance(tmp_path) -> None:
    """`pdserve up ... --engine-args "--chat-template FILE --trust-request-chat-template"`: every
    instance's `pdserve serve` command line takes them (the template file read by each instance)."""
    from pdserve.server.command import add_parser as add_serve_parser
    from pdserve.server.command import settings_from_args

    template = tmp_path / "chat template.jinja"  # a space: shlex keeps a quoted path whole
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    up = argparse.ArgumentParser()
    add_parser(up.add_subparsers())
    args = up.parse_args(["up", "disagg", "m", "--engine-args",
                          f"--chat-template '{template}' --trust-request-chat-template"])
    spec = spec_from_args(args)
    serve = argparse.ArgumentParser()
    add_serve_parser(serve.add_subparsers())
    for plan in plan_instances(spec, (0, 1)):
        argv = instance_argv(spec, plan, 8000, "127.0.0.1:9000")
        settings = settings_from_args(serve.parse_args(argv[argv.index("serve"):]))
        assert settings.chat_template == template.read_text() and settings.trust_request_chat_template
