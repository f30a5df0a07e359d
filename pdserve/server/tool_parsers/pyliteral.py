"""Python literals as JSON values, read with `ast` and never evaluated: strings, numbers, booleans,
None, lists (and tuples), dicts with string keys, and JSON's own `true` / `false` / `null`. Anything
else (a name, a call, an operator other than a sign, bytes, a set, a non-finite float) is refused."""

from __future__ import annotations

import ast
import math
import warnings

from pydantic import JsonValue

_JSON_NAMES: dict[str, JsonValue] = {"true": True, "false": False, "null": None}
# What ast.parse may raise on hostile text (deep nesting, huge numbers) besides a SyntaxError.
PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)


class NotALiteral(ValueError):
    """The expression is not one of the literals read here."""


def parse_expression(text: str) -> ast.expr:
    """One Python expression (surrounding whitespace allowed); one of PARSE_ERRORS otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences warn; they are read as Python reads them
        return ast.parse(text.strip(), mode="eval").body


def literal_value(node: ast.expr) -> JsonValue:
    """The JSON value of a literal expression; NotALiteral for anything else."""
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, ast.Constant):
        value = _constant(node.operand.value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, JsonValue] = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise NotALiteral("a dict key that is not a string")
            out[key.value] = literal_value(value)
        return out
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise NotALiteral(type(node).__name__)


def python_literal(text: str) -> JsonValue:
    """The JSON value of `text`, one Python literal; NotALiteral when it is not one."""
    try:
        return literal_value(parse_expression(text))
    except NotALiteral:
        raise
    except PARSE_ERRORS as e:
        raise NotALiteral(str(e)) from None


def _constant(value: object) -> JsonValue:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise NotALiteral(f"a {type(value).__name__} constant")
