"""``srlora train --config run.yaml [--resume DIR]``: one run, checkpointed, resumable.

The YAML file takes the flags of ``srlora compare`` (underscored: ``batch_size``, ``r_target``,
...) with one ``method``, one ``seed`` and one ``lr``, plus ``save_every``. It is the compare
machinery with a single job: same data split, runner, results.json, table and plots.
"""

from __future__ import annotations

import argparse
import os

from . import UsageError

SINGLE = {"method": "methods", "seed": "seeds"}


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="one fine-tuning run from a YAML config, with checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="YAML file: compare's options plus method, seed, lr, "
        "save_every (required unless --resume)",
    )
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in this output folder from its last checkpoint",
    )
    p.add_argument(
        "--save-every",
        type=int,
        help="checkpoint every N optimizer steps (default: only at the end)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def compare_namespace(options: dict) -> argparse.Namespace:
    """compare's defaults overridden by ``options`` (YAML keys); unknown keys and values of the
    wrong type are UsageErrors naming the key."""
    from .compare import register as register_compare

    parser = argparse.ArgumentParser(add_help=False)
    subs = parser.add_subparsers(dest="command")
    register_compare(subs)
    actions = {a.dest: a for a in subs.choices["compare"]._actions}
    ns = parser.parse_args(["compare"])
    for key, value in options.items():
        dest = SINGLE.get(key, key)
        if (
            not hasattr(ns, dest)
            or dest in ("func", "command", "help", "methods", "seeds")
            and key == dest
        ):
            raise UsageError(f"config: unknown option {key!r}")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        setattr(ns, dest, _convert(key, value, actions[dest]))
    return ns


def _convert(key: str, value, action: argparse.Action):
    """One YAML value as the compare flag ``action`` would have parsed it."""
    if value is None:
        return action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"config: {key}: expected true or false, got {value!r}")
        return value
    kind = action.type or str
    if (
        isinstance(value, bool)
        or isinstance(value, (dict, list))
        or kind is int
        and isinstance(value, float)
    ):
        raise UsageError(f"config: {key}: expected {_KIND.get(kind, 'a value')}, got {value!r}")
    try:
        out = kind(value) if kind is not str else str(value)
    except (TypeError, ValueError):
        raise UsageError(
            f"config: {key}: expected {_KIND.get(kind, 'a value')}, got {value!r}"
        ) from None
    if action.choices is not None and out not in action.choices:
        raise UsageError(f"config: {key}: {out!r} is not one of {', '.join(action.choices)}")
    return out


_KIND = {int: "an integer", float: "a number", str: "a string"}


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f"--config {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path!r}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path!r}: expected a mapping of options")
    return data


_FREE = ("save_every", "out")  # may differ between the first run and its --resume


def run(args) -> int:
    import yaml

    from ..experiments import plots, report
    from ..experiments.compare import run_compare
    from .compare import _check_out, build_config, check_new_out, check_resumable, make_out, prepare

    if args.resume:
        saved = os.path.join(args.resume, "run.yaml")
        if not os.path.isfile(saved):
            raise UsageError(f"--resume {args.resume!r}: no run.yaml there; not a train folder")
        options = load_yaml(saved)
        if args.config:  # the run's options must agree; where it saves and how often may not
            given = {k: v for k, v in load_yaml(args.config).items() if k not in _FREE}
            diff = sorted(
                k for k in set(given) | set(options) - set(_FREE) if given.get(k) != options.get(k)
            )
            if diff:
                raise UsageError(f"--config differs from the run being resumed ({saved}) in {diff}")
    elif args.config:
        options = load_yaml(args.config)
    else:
        raise UsageError("give --config run.yaml (or --resume DIR)")
    save_every = args.save_every if args.save_every is not None else options.pop("save_every", 0)
    options.pop("save_every", None)
    ns = compare_namespace(options)
    cfg = build_config(ns)
    if len(cfg.methods) != 1 or len(cfg.seeds) != 1 or len(cfg.lrs[cfg.methods[0]]) != 1:
        raise UsageError(
            "train runs one method, one seed and one lr; use `srlora compare` for grids"
        )
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
        raise UsageError(f"save_every: must be an integer >= 0, got {save_every!r}")
    if args.resume:
        cfg.out = args.resume
    elif not options.get("out"):
        cfg.out = os.path.join("runs", f"train-{cfg.task}-{cfg.methods[0]}")
    cfg.save_every = save_every or cfg.steps  # always keep the final state for export
    _check_out(cfg.out)
    if args.resume:
        check_resumable(cfg.out)
    else:
        check_new_out(cfg.out)  # a finished run is never overwritten
    bundle, enc, sp, meta = prepare(cfg)
    make_out(cfg.out)  # only now, with every input checked: a refused input leaves nothing
    with open(os.path.join(cfg.out, "run.yaml"), "w") as f:
        yaml.safe_dump({**options, "out": cfg.out}, f)
    try:
        results = run_compare(
            cfg, bundle, enc, sp, meta, progress=not args.no_progress, resume=bool(args.resume)
        )
    except ValueError as e:
        if str(e).startswith("--resume"):
            raise UsageError(str(e)) from None
        raise
    print(report.format_report(results))
    for p in plots.write_all(results, cfg.out):
        print(f"wrote {p}")
    print(
        f"wrote {os.path.join(cfg.out, 'results.json')}; checkpoints in "
        f"{os.path.join(cfg.out, 'checkpoints')}; export with `srlora export {cfg.out} "
        "--format peft --out DIR`"
    )
    return 0
