"""``srlora export RUN_DIR --format peft|merged --out DIR``: a plain PEFT adapter against the
ORIGINAL base model, or the merged model in the base model's own format, from the last
checkpoint of a ``srlora train`` (or ``compare --save-every``) run: RUN_DIR's own checkpoint,
wherever the run was first written. An ``--out`` folder that is not empty is refused unless
``--overwrite``; RUN_DIR itself and its checkpoints are always refused."""

from __future__ import annotations

import argparse
import dataclasses
import os

from . import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a run as a PEFT adapter or a merged model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of srlora train/compare")
    p.add_argument("--format", choices=("peft", "merged"), default="peft")
    p.add_argument("--out", required=True, help="folder to write (new or empty)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out, replacing files of the same name",
    )
    p.add_argument(
        "--run", help="which run of a comparison: METHOD[,SEED[,LR]] (default: the only run)"
    )
    p.add_argument("--rank", type=int, help="peft: compress to this rank (reports the error)")
    p.add_argument(
        "--energy",
        type=float,
        help="peft: compress keeping this fraction of the spectral energy (reports the error)",
    )
    p.set_defaults(func=run)


def pick_run(results: dict, spec: str | None) -> dict:
    runs = results["runs"]
    if spec:
        parts = spec.split(",")
        keys = ("method", "seed", "lr")
        try:
            want = {
                k: (str if k == "method" else int if k == "seed" else float)(v)
                for k, v in zip(keys, parts)
            }
        except ValueError:
            raise UsageError(f"--run {spec!r}: expected METHOD[,SEED[,LR]]") from None
        runs = [r for r in runs if all(r[k] == v for k, v in want.items())]
    if len(runs) != 1:
        names = [f"{r['method']},{r['seed']},{r['lr']:g}" for r in results["runs"]]
        raise UsageError(
            f"{len(runs)} runs match; choose one with --run from: "
            f"{'; '.join(names) or 'none finished'}"
        )
    return runs[0]


def check_args(args) -> None:
    """Every flag, before anything is read or written."""
    from .compare import _check_out

    if args.format == "merged" and (args.rank is not None or args.energy is not None):
        raise UsageError("--rank/--energy apply to --format peft")
    if args.rank is not None and args.energy is not None:
        raise UsageError("give --rank or --energy, not both")
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank: must be >= 1, got {args.rank}")
    if args.energy is not None and not 0.0 < args.energy <= 1.0:
        raise UsageError(f"--energy: must be a fraction in (0, 1], got {args.energy}")
    _check_out(args.out)
    check_out_folder(args.run_dir, args.out, args.overwrite)


def check_out_folder(run_dir_arg: str, out: str, overwrite: bool) -> None:
    """--out must not be the run's own folder (or its checkpoints), and must be new or empty
    unless --overwrite."""
    run, dest = os.path.realpath(run_dir_arg), os.path.realpath(out)
    ckpts = os.path.join(run, "checkpoints")
    if dest == run or dest == ckpts or dest.startswith(ckpts + os.sep):
        where = "" if dest == run else " (its checkpoints)"
        raise UsageError(
            f"--out {out!r} is the run's own folder{where}; export into another folder"
        )
    if os.path.isdir(dest) and os.listdir(dest) and not overwrite:
        first = sorted(os.listdir(dest))[0]
        raise UsageError(
            f"--out {out!r} is not empty (it holds {first!r}); choose a new folder, "
            "or pass --overwrite to replace files of the same name"
        )


def check_record(rec, path: str) -> None:
    """One run record: a mapping with a string method, an integer seed and a numeric lr."""
    if not isinstance(rec, dict):
        raise UsageError(f"RUN_DIR: {path}: a run record is not a mapping ({rec!r:.60})")
    for key, types, what in (
        ("method", (str,), "a string"),
        ("seed", (int,), "an integer"),
        ("lr", (int, float), "a number"),
    ):
        v = rec.get(key)
        if key not in rec or not isinstance(v, types) or isinstance(v, bool):
            raise UsageError(
                f"RUN_DIR: {path}: runs[...].{key} is {v!r}, not {what}; not a "
                "srlora results file (was it edited?)"
            )


def read_run(run_dir_arg: str, spec) -> tuple:
    """(results, CompareConfig, the chosen run record) of a run folder, each checked."""
    from ..experiments.compare import CompareConfig
    from . import load_results

    path = os.path.join(run_dir_arg, "results.json")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir_arg!r}: no results.json; not a srlora run folder")
    results = load_results(path, "RUN_DIR")
    for r in results["runs"]:
        check_record(r, path)
    try:
        cfg = CompareConfig(**results["config"])
        rec = pick_run(results, spec)
        data = results["data"]
        kind, n_labels = data["kind"], len(data["labels"])
        missing = [k for k in ("method", "seed", "lr") if k not in rec]
        if missing:
            raise KeyError(f"runs[...].{missing[0]}")
    except (TypeError, KeyError) as e:
        raise UsageError(
            f"RUN_DIR: {path} is not a srlora results file (bad or missing entry: {e})"
        ) from None
    return results, cfg, rec, kind, n_labels


def run(args) -> int:
    import srlora
    from ..experiments import checkpointing
    from ..experiments.compare import run_dir
    from ..experiments.models import load_model

    check_args(args)
    results, cfg, rec, kind, n_labels = read_run(args.run_dir, args.run)
    # RUN_DIR's own checkpoints, not those at the "out" recorded in results.json (a copied or
    # moved run folder exports itself)
    here = dataclasses.replace(cfg, out=args.run_dir)
    ckpt = checkpointing.latest(run_dir(here, rec["method"], rec["lr"], rec["seed"]))
    if (
        ckpt is None
        and (cfg.variants.get(rec["method"], {}).get("method") or rec["method"]) == "full"
    ):
        raise UsageError(
            f"run {rec['method']},{rec['seed']},{rec['lr']:g} is full "
            "fine-tuning: it has no adapter to export"
        )
    if ckpt is None:
        raise UsageError(
            f"run {rec['method']},{rec['seed']},{rec['lr']:g} has no checkpoint; "
            "train with save_every (srlora train always saves the final step)"
        )
    bundle = load_model(cfg.model, kind, n_labels, cfg.target_modules)  # ModelError: exit 2
    try:  # named, so that a damaged checkpoint points at the folder that holds it
        manifest = srlora.read_manifest(ckpt)
        model, controller = srlora.wrap(
            bundle.make(rec["seed"]), srlora.SRLoRAConfig.from_dict(manifest["config"])
        )
        srlora.load_checkpoint(ckpt, model=model, controller=controller, restore_rng=False)
    except srlora.CheckpointMismatchError as e:
        raise UsageError(f"checkpoint {ckpt}: {e}") from None
    if args.format == "peft":
        res = srlora.export_adapter(
            model,
            controller,
            args.out,
            rank=args.rank,
            energy=args.energy,
            overwrite=args.overwrite,
        )
        print(
            f"wrote a PEFT LoRA adapter to {args.out} (max rank {res.rank}; relative error "
            f"{res.error:.2e}); load it with PeftModel.from_pretrained(<original "
            f"{bundle.name}>, {args.out!r})"
        )
    else:
        srlora.save_merged(model, controller, args.out, overwrite=args.overwrite)
        print(f"wrote the merged model to {args.out}")
    if bundle.tokenizer is not None:
        bundle.tokenizer.save_pretrained(args.out)
    return 0
