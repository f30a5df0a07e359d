"""`make demo`: the main job on the embedded default model.

Until the benchmark lab lands, the demo is offline generation on the default dummy model that
prints tokens/s.
"""

from __future__ import annotations

from pdserve.cli import main as cli_main


def run(model: str, out_dir: str) -> int:
    del out_dir  # used by the benchmark-lab demo
    return cli_main(["generate", model, "--num-prompts", "16", "--input-len", "256", "--max-tokens", "64"])
