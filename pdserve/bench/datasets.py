"""Prompt files for `pdserve bench --dataset-name sharegpt|custom`: read, checked, cached.

The formats are those of vLLM's `vllm bench serve`:

- ``sharegpt``: a JSON list of ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt",
  "value": ...}, ...]}``. As vLLM, an entry without at least two turns is dropped, and of the others
  the first turn is the prompt and the second the reply whose token count is the output length
  (vLLM takes turns 0 and 1 whatever their ``from``; ShareGPT's conversations open with the human).
- ``custom``: JSON Lines, one object with a string ``"prompt"`` per line (blank lines skipped); every
  request asks for the same number of tokens (``--custom-output-len``).

A malformed file is a `DatasetError` whose message starts with ``argument --dataset-path:`` (the
command line shows it as the flag's error). Loading is cached per file (path, size, mtime), so a
sweep reads a large ShareGPT file once. Sampling and tokenization are in prompts.py.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Literal

DatasetName = Literal["random", "sharegpt", "custom"]
DATASET_NAMES: tuple[DatasetName, ...] = ("random", "sharegpt", "custom")
FLAG = "--dataset-path"


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the flag to fix."""

    def __init__(self, message: str, flag: str = FLAG) -> None:
        super().__init__(f"argument {flag}: {message}")


@dataclass(frozen=True)
class DatasetEntry:
    """One prompt of a file; `reply` is ShareGPT's second turn (None for a custom file)."""

    prompt: str
    reply: str | None = None


@dataclass(frozen=True)
class Dataset:
    """Every usable entry of one file, in file order."""

    name: DatasetName
    path: str
    entries: tuple[DatasetEntry, ...]


def load_dataset(name: DatasetName, path: str) -> Dataset:
    """The entries of `path` read as dataset `name` ("sharegpt" or "custom"); DatasetError when the
    file is missing, unreadable, malformed, or holds no usable entry."""
    if name not in ("sharegpt", "custom"):
        raise ValueError(f"dataset {name!r} has no file")
    try:
        st = os.stat(path)
    except OSError as e:
        raise DatasetError(f"cannot read {path!r}: {e.strerror or e}") from None
    return _load_cached(name, os.path.abspath(path), st.st_size, st.st_mtime_ns, path)


@functools.lru_cache(maxsize=4)
def _load_cached(name: DatasetName, _abspath: str, _size: int, _mtime_ns: int, path: str) -> Dataset:
    entries = _read_sharegpt(path) if name == "sharegpt" else _read_custom(path)
    return Dataset(name, path, entries)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path!r}: {e.strerror or e}") from None


def _read_sharegpt(path: str) -> tuple[DatasetEntry, ...]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path!r} is not JSON (line {e.lineno}: {e.msg}); a ShareGPT file is a JSON list of "
            '{"conversations": [...]} objects'
        ) from None
    if not isinstance(data, list):
        raise DatasetError(f"{path!r}: a ShareGPT file is a JSON list of conversations, not a {type(data).__name__}")
    entries: list[DatasetEntry] = []
    for i, item in enumerate(data):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue  # vLLM's filter: at least two turns
        first, second = (_turn_text(path, i, k, turns[k]) for k in (0, 1))
        entries.append(DatasetEntry(first, second))
    if not entries:
        raise DatasetError(
            f"{path!r}: no conversation with at least two turns "
            '(expected [{"conversations": [{"from": "human", "value": ...}, '
            '{"from": "gpt", "value": ...}]}, ...])'
        )
    return tuple(entries)


def _turn_text(path: str, entry: int, k: int, turn: object) -> str:
    value = turn.get("value") if isinstance(turn, dict) else None
    if not isinstance(value, str):
        raise DatasetError(f'{path!r}: entry {entry}: conversations[{k}] has no string "value"')
    return value


def _read_custom(path: str) -> tuple[DatasetEntry, ...]:
    entries: list[DatasetEntry] = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path!r} line {n}: not JSON ({e.msg}); a custom dataset is JSON Lines, "
                'one {"prompt": "..."} per line'
            ) from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str):
            raise DatasetError(f'{path!r} line {n}: expected an object with a string "prompt"')
        entries.append(DatasetEntry(prompt))
    if not entries:
        raise DatasetError(f'{path!r}: no prompt (expected JSON Lines, one {{"prompt": "..."}} per line)')
    return tuple(entries)
