"""benchmarks/gpu_check.py's pieces that run before any GPU work: which carried wheels fit the GPU
machine's Python (runs/gpu_wheels holds them for several versions; pip refuses two of one project),
and the pytest log parsing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

WHEELS = [
    "fastapi-0.165.0-py3-none-any.whl",
    "llguidance-1.9.1-cp39-abi3-manylinux_2_31_x86_64.whl",
    "msgspec-0.22.0-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "msgspec-0.22.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "msgspec-0.22.0-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
    "pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
    "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "README.txt",
]


def supported(version: tuple[int, int]) -> list:
    from packaging import tags

    platforms = [*(f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)), "manylinux2014_x86_64", "linux_x86_64"]
    return [*tags.cpython_tags(version, platforms=platforms), *tags.compatible_tags(version, platforms=platforms)]


@pytest.mark.parametrize(
    ("version", "want"),
    [
        ((3, 11), {"msgspec-0.22.0-cp311", "pyzmq-27.3.0-cp311"}),
        ((3, 12), {"msgspec-0.22.0-cp312", "pyzmq-27.3.0-cp312", "pydantic_core-2.50.5-cp312"}),
        ((3, 13), {"msgspec-0.22.0-cp313", "pyzmq-27.3.0-cp312"}),  # pyzmq's cp312-abi3 serves 3.13
    ],
)
def test_pick_wheels_takes_one_per_project_that_fits(version, want):
    picked = [p.name for p in gpu_check.pick_wheels([Path(w) for w in WHEELS], supported(version))]
    binary = {"-".join(n.split("-")[:3]) for n in picked if n.startswith(("msgspec", "pyzmq", "pydantic_core"))}
    assert binary == want
    assert "fastapi-0.165.0-py3-none-any.whl" in picked and any(n.startswith("llguidance") for n in picked)
    names = [n.split("-")[0] for n in picked]
    assert len(names) == len(set(names))  # pip stops on two wheels of one project


def test_pick_wheels_of_the_running_python():
    import sys

    picked = gpu_check.pick_wheels([Path(w) for w in WHEELS])
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert all(tag in n or "abi3" in n or "-none-" in n for n in (p.name for p in picked))


def test_pytest_counts_of_a_finished_and_a_cut_run():
    done = "tests/gpu/a.py::t PASSED\n==== 3 passed, 1 failed, 2 skipped, 1 error in 12.34s ====\n"
    assert gpu_check.pytest_counts(done) == {"passed": 3, "failed": 1, "skipped": 2, "error": 1}
    cut = "tests/gpu/a.py::t1 PASSED [ 10%]\ntests/gpu/a.py::t2 FAILED [ 20%]\ntests/gpu/a.py::t3 SKIPPED (x)\n"
    assert gpu_check.pytest_counts(cut) == {"passed": 1, "failed": 1, "skipped": 1, "error": 0}


def test_disagg_stage_compares_in_float32_by_default():
    """The decode instance recomputes the last prompt token in a one-row step; in bf16 that row rounds
    differently from the standalone's prefill chunk, so exact text equality is only asked of float32."""
    assert gpu_check.parse_args([]).disagg_dtype == "float32"
    assert gpu_check.parse_args(["--disagg-dtype", "bfloat16"]).disagg_dtype == "bfloat16"
