"""`pdserve` command line: serve | proxy | up | bench | sweep | export | generate | demo.

Each subcommand lives next to the code it drives (`<package>/command.py` with `add_parser`);
this file only assembles them. Heavy imports (torch) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pdserve.config_file import expand_config_file

# (module with add_parser) in the order shown by --help.
_COMMANDS = (
    "pdserve.server.command",
    "pdserve.proxy.command",
    "pdserve.launch_command",
    "pdserve.bench.command",
    "pdserve.bench.sweep_command",
    "pdserve.model.export_command",
    "pdserve.offline_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(expand_config_file(parser, list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad model path, preset, dtype...: a message, not a trace
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
