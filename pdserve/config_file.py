"""vLLM's `--config FILE`: a YAML mapping of a command's flags, read before its command line.

    # serve.yaml                           pdserve serve --config serve.yaml --port 8001
    model: dummy:qwen3-tiny
    port: 8000                             # the command line wins: port 8001
    max_num_seqs: 32                       # underscores or dashes, as vLLM
    served-model-name: [tiny, tiny-chat]   # a list for a flag taking several values
    enable-prefix-caching: false           # a bool for a flag: true gives it, false omits it
    allowed-origins: ["https://x.example"] # a list for a flag taking one JSON value: sent as JSON

Each key is a long flag without its dashes (or a positional argument's name: `model`,
`topology`), its value what the command line would take. `expand_config_file` turns the file into
command-line tokens placed before the command line's own, and drops every key whose flag the
command line gives (so the command line overrides the file, lists included). A key that names no
flag of the command is a usage error naming the key and the file, as is a file that cannot be read
or is not a YAML mapping. A positional argument in the file is used unless the command line gives
it right after the command (`pdserve serve MODEL --config f.yaml`).
"""

from __future__ import annotations

import argparse
import json
import re

FLAG = "--config"
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(FLAG, default=None, metavar="FILE",
                   help="vLLM's YAML config: flag names as keys (without dashes; '_' or '-'), values as on the "
                        "command line, lists for flags taking several values; flags on the command line win")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def _resolve(sub: argparse.ArgumentParser, token: str) -> argparse.Action | None:
    """The optional action a command-line token gives (exact, `--flag=value`, or argparse's unique
    abbreviation), or None (a value, a positional)."""
    if not token.startswith("-") or token == "-" or _NEGATIVE_NUMBER.match(token):
        return None
    name = token.split("=", 1)[0]
    actions = sub._option_string_actions
    if name in actions:
        return actions[name]
    if name.startswith("--") and sub.allow_abbrev:
        matches = {a for opt, a in actions.items() if opt.startswith(name)}
        if len(matches) == 1:
            return matches.pop()
    return None


def _load(sub: argparse.ArgumentParser, path: str) -> dict[object, object]:
    import yaml  # only when a config file is given

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as e:
        sub.error(f"{FLAG} {path}: cannot read it: {e.strerror or e}")
    except yaml.YAMLError as e:
        sub.error(f"{FLAG} {path}: not valid YAML: {e}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        sub.error(f"{FLAG} {path}: expected a mapping of flag names to values, got a {type(values).__name__}")
    return values


def _text(value: object) -> str:
    if isinstance(value, (dict, list, bool)) or value is None:
        return json.dumps(value)
    return str(value)


def _tokens(sub: argparse.ArgumentParser, path: str, key: str, option: str, action: argparse.Action,
            value: object) -> list[str]:
    """The command-line tokens of one key."""
    if value is None:
        sub.error(f"{FLAG} {path}: key {key!r} has no value")
    if action.nargs == 0:  # a flag: store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            sub.error(f"{FLAG} {path}: key {key!r} is a flag: expected true or false, got {value!r}")
        if value:
            return [option]
        if isinstance(action, argparse.BooleanOptionalAction):  # false: the other spelling
            return [next(o for o in action.option_strings if o != option and o.startswith("--"))]
        return []
    if action.nargs in (None, "?"):  # one value: a list or mapping goes as JSON
        return [f"{option}={_text(value)}"]
    items = value if isinstance(value, list) else [value]
    return [option, *(_text(v) for v in items)] if items else []


def expand_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with its subcommand's `--config FILE` expanded (see the module docstring); unchanged
    when there is none. Usage errors exit as argparse does (status 2, the message on stderr)."""
    if not argv or argv[0].startswith("-"):
        return argv
    command, rest = argv[0], argv[1:]
    sub = _subparser(parser, command)
    if sub is None or FLAG not in sub._option_string_actions:
        return argv
    config_action = sub._option_string_actions[FLAG]
    cli = rest[: rest.index("--")] if "--" in rest else rest
    given: set[argparse.Action] = set()
    path = None
    for i, token in enumerate(cli):
        action = _resolve(sub, token)
        if action is None:
            continue
        given.add(action)
        if action is config_action:
            if "=" in token:
                path = token.split("=", 1)[1]
            elif i + 1 < len(cli):
                path = cli[i + 1]
    if path is None:
        return argv  # no --config (argparse reports a --config without its FILE)
    values = _load(sub, path)
    # Flags that exclude each other: the command line's choice wins over the file's other one.
    exclusive = {a: g for g in sub._mutually_exclusive_groups for a in g._group_actions}
    given_groups = {exclusive[a] for a in given if a in exclusive}
    positionals = [a for a in sub._actions if not a.option_strings]
    from_file: dict[str, object] = {}
    tokens: list[str] = []
    for key, value in values.items():
        name = str(key).replace("_", "-")
        option = f"--{name}"
        action = sub._option_string_actions.get(option) if isinstance(key, str) else None
        positional = next((a for a in positionals if isinstance(key, str) and a.dest == name.replace("-", "_")), None)
        if positional is not None:
            from_file[positional.dest] = value
            continue
        if action is config_action:
            sub.error(f"{FLAG} {path}: a config file cannot name another one (key {key!r})")
        if action is None or isinstance(action, argparse._HelpAction):
            sub.error(f"unknown key {key!r} in {FLAG} {path}: `pdserve {command}` has no flag {option}")
        if action in given or exclusive.get(action) in given_groups:
            continue  # the command line's value wins
        tokens += _tokens(sub, path, str(key), option, action, value)
    # Positional arguments: the command line's leading ones, then the file's for those it lacks.
    leading = 0
    while leading < len(rest) and not rest[leading].startswith("-"):
        leading += 1
    head = list(rest[:leading])
    for action in positionals[leading:]:
        if action.dest in from_file:
            value = from_file[action.dest]
            head += [_text(v) for v in value] if isinstance(value, list) else [_text(value)]
        else:
            break
    return [command, *head, *tokens, *rest[leading:]]
