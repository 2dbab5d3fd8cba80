"""The ``srlora`` console command: a thin dispatcher over one module per subcommand.

Each module ``srlora_lab.cli.<name>`` defines ``register(subparsers)`` (adds its parser, sets
``func``) and holds no training logic: it parses flags and calls into the library.
Exit codes: 0 success, 2 bad input (before any work starts), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("compare", "study", "train", "export", "bench", "assets", "summary")


class UsageError(Exception):
    """Bad input detected by a subcommand before work started: printed, exit code 2."""


# Library exceptions that mean "the input is bad" (a data file, a model, a checkpoint), never a
# bug: main() prints them as one line with exit code 2. Anything else keeps its traceback.
INPUT_ERRORS = (
    ("srlora_lab.experiments.tasks", "DataError"),
    ("srlora_lab.experiments.models", "ModelError"),
    ("srlora._errors", "CheckpointMismatchError"),
)


def _is_input_error(e: BaseException) -> bool:
    for module, name in INPUT_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)  # only modules already imported
        if cls is not None and isinstance(e, cls):
            return True
    return False


def load_results(path: str, flag: str) -> dict:
    """A run folder's results.json, checked to be one (else a UsageError naming the problem)."""
    import json

    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path} ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{flag}: {path} is not valid JSON ({e}); not a srlora results file"
        ) from None
    if not (
        isinstance(results, dict)
        and isinstance(results.get("runs"), list)
        and isinstance(results.get("config"), dict)
    ):
        raise UsageError(
            f"{flag}: {path} is not a srlora results file (no 'runs' list and 'config' mapping)"
        )
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srlora", description="SRLoRA fine-tuning tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"srlora_lab.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"srlora_lab.cli.{name}":
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
    except Exception as e:
        if not isinstance(e, UsageError) and not _is_input_error(e):
            raise  # a bug: keep the traceback
        print(f"srlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"srlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
