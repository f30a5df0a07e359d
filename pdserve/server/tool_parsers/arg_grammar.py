"""Lark rules for a call whose arguments are written one by one (not as one JSON object): the
tool's parameters in the order of its schema's `properties`, the `required` ones always, each
other one or not, with a separator between two written ones. Used by the formats whose tool_choice
"required" / named grammar spells out each argument (pythonic, qwen3_coder)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import JsonValue

from pdserve.server.protocol import FunctionDef


@dataclass(frozen=True)
class Param:
    """One parameter of a tool: its name, JSON schema, and whether the schema requires it."""

    name: str
    schema: JsonValue
    required: bool


def params_of(tool: FunctionDef) -> list[Param]:
    """The tool's parameters in schema order (none when its schema has no `properties`)."""
    schema = tool.parameters or {}
    properties, required = schema.get("properties"), schema.get("required")
    if not isinstance(properties, dict):
        return []
    needed = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()  # [[...]]: none
    return [Param(name, sub, name in needed) for name, sub in properties.items()]


def compact_schema(schema: JsonValue) -> str:
    """A schema as `%json` takes it, with the compact whitespace of the other constraints."""
    body = schema if isinstance(schema, dict) else {}
    return json.dumps({**body, "x-guidance": {"whitespace_flexible": False}})


def argument_rules(prefix: str, items: Sequence[tuple[str, bool]], separator: str) -> tuple[str | None, list[str]]:
    """(the expression of the whole argument list, the rules it needs) for `items`, each a Lark
    expression of one written argument and whether it is required; None: no arguments at all.
    Rule names start with `prefix` (lowercase, unique in the grammar)."""
    sep = f"{json.dumps(separator)} " if separator else ""
    rules: list[str] = []
    first: str | None = None  # how the rest goes when nothing is written yet
    later: str | None = None  # how the rest goes after something is
    for i in reversed(range(len(items))):
        item, required = items[i]
        now_first = " ".join(p for p in (item, later) if p)
        now_later = " ".join(p for p in (sep + item, later) if p)
        if not required:
            now_first = f"({now_first} | {first})" if first else f"({now_first})?"
            now_later = f"({now_later} | {later})" if later else f"({now_later})?"
        rules += [f"{prefix}_f{i}: {now_first}", f"{prefix}_l{i}: {now_later}"]
        first, later = f"{prefix}_f{i}", f"{prefix}_l{i}"
    return first, rules
