"""What the offline one-core benchmarks share: their common flags, pinning to one core with one
thread, and writing the figures. Imported by the scripts next to it (run as
`.venv/bin/python benchmarks/<script>.py`, whose folder is then on sys.path)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def parser(doc: str | None, *, model: str = "dummy:qwen3-cpu-bench", batch: int | None = 16,
           input_len: int = 128, output_len: int = 64, rounds: int = 3, cpu: int = 0) -> argparse.ArgumentParser:
    """A parser with --model, --batch (unless None: the script adds its own), --input-len,
    --output-len, --rounds, --cpu and --json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model)
    if batch is not None:
        p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--input-len", type=int, default=input_len)
    p.add_argument("--output-len", type=int, default=output_len)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--cpu", type=int, default=cpu)
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def pin(cpu: int) -> None:
    """This process on core `cpu`, torch on one thread."""
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)


def write_json(path: str | None, result: object) -> None:
    """The figures as JSON at `path` (nothing when None)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
