"""``srlora summary DIR [DIR ...] --out PNG``: the one-picture answer over finished studies.

Reads each DIR/study.json (no training) and draws, per task, each method's test loss against
LoRA's with its paired interval (experiments/summary.py). The README's figure is
``srlora summary studies/results/headroom studies/results/lm-cpu studies/results/paper-claims
studies/results/lm-variants --out docs/figures/summary.png``.
"""

from __future__ import annotations

import os

from . import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "summary",
        help="one figure over finished studies: each method against "
        "LoRA per task (reads study.json files)",
    )
    p.add_argument(
        "studies",
        nargs="+",
        help="study folders (each with a study.json); for a task in several, the first named wins",
    )
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments import summary

    for d in args.studies:
        if not os.path.isfile(os.path.join(d, "study.json")):
            raise UsageError(f"{d!r}: not a study folder (no study.json)")
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = sorted(FigureCanvasBase.get_supported_filetypes())
    ext = os.path.splitext(args.out)[1].lstrip(".").lower()
    if ext not in kinds:  # matplotlib would write OUT.png for no extension (past the check below)
        raise UsageError(
            f"--out {args.out!r}: name the picture's file with one of the "
            f"extensions {', '.join(kinds)} (e.g. summary.png)"
        )
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a folder; name the picture's file")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out!r} exists; pass --overwrite to replace it")
    try:
        data = summary.collect(args.studies)
    except ValueError as e:  # a study.json that is not a study's summary
        raise UsageError(str(e)) from None
    if not data:
        raise UsageError("no finished comparison with LoRA on test loss in these studies")
    print(f"wrote {summary.figure(data, args.out)} ({len(data)} task(s))")
    return 0
