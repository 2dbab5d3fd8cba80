"""The ``srlora`` console command: a thin dispatcher over one module per subcommand.

Each module ``srlora.cli.<name>`` defines ``register(subparsers)`` (adds its parser, sets
``func``) and holds no training logic: it parses flags and calls into the library.
Exit codes: 0 success, 2 bad input (before any work starts), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("compare", "study", "train", "export", "bench", "assets")


class UsageError(Exception):
    """Bad input detected by a subcommand before work started: printed, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srlora", description="SRLoRA fine-tuning tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"srlora.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"srlora.cli.{name}":
                continue  # subcommand not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"srlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"srlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
