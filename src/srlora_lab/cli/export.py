"""``srlora export RUN_DIR --format peft|merged --out DIR``: a plain PEFT adapter against the
ORIGINAL base model, or the merged model in the base model's own format, from the last
checkpoint of a ``srlora train`` (or ``compare --save-every``) run."""
from __future__ import annotations

import argparse
import os

from . import UsageError


def register(sub) -> None:
    p = sub.add_parser("export", help="export a run as a PEFT adapter or a merged model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of srlora train/compare")
    p.add_argument("--format", choices=("peft", "merged"), default="peft")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--run", help="which run of a comparison: METHOD[,SEED[,LR]] (default: the "
                                 "only run)")
    p.add_argument("--rank", type=int, help="peft: compress to this rank (reports the error)")
    p.add_argument("--energy", type=float, help="peft: compress keeping this fraction of the "
                                                "spectral energy (reports the error)")
    p.set_defaults(func=run)


def pick_run(results: dict, spec: str | None) -> dict:
    runs = results["runs"]
    if spec:
        parts = spec.split(",")
        keys = ("method", "seed", "lr")
        try:
            want = {k: (str if k == "method" else int if k == "seed" else float)(v)
                    for k, v in zip(keys, parts)}
        except ValueError:
            raise UsageError(f"--run {spec!r}: expected METHOD[,SEED[,LR]]") from None
        runs = [r for r in runs if all(r[k] == v for k, v in want.items())]
    if len(runs) != 1:
        names = [f"{r['method']},{r['seed']},{r['lr']:g}" for r in results["runs"]]
        raise UsageError(f"{len(runs)} runs match; choose one with --run from: "
                         f"{'; '.join(names) or 'none finished'}")
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


def read_run(run_dir_arg: str, spec) -> tuple:
    """(results, CompareConfig, the chosen run record) of a run folder, each checked."""
    from ..experiments.compare import CompareConfig
    from . import load_results

    path = os.path.join(run_dir_arg, "results.json")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir_arg!r}: no results.json; not a srlora run folder")
    results = load_results(path, "RUN_DIR")
    try:
        cfg = CompareConfig(**results["config"])
        rec = pick_run(results, spec)
        data = results["data"]
        kind, n_labels = data["kind"], len(data["labels"])
        missing = [k for k in ("method", "seed", "lr") if k not in rec]
        if missing:
            raise KeyError(f"runs[...].{missing[0]}")
    except (TypeError, KeyError) as e:
        raise UsageError(f"RUN_DIR: {path} is not a srlora results file (bad or missing "
                         f"entry: {e})") from None
    return results, cfg, rec, kind, n_labels


def run(args) -> int:
    import srlora
    from ..experiments import checkpointing
    from ..experiments.compare import run_dir
    from ..experiments.models import load_model

    check_args(args)
    results, cfg, rec, kind, n_labels = read_run(args.run_dir, args.run)
    ckpt = checkpointing.latest(run_dir(cfg, rec["method"], rec["lr"], rec["seed"]))
    if ckpt is None:
        raise UsageError(f"run {rec['method']},{rec['seed']},{rec['lr']:g} has no checkpoint; "
                         "train with save_every (srlora train always saves the final step)")
    bundle = load_model(cfg.model, kind, n_labels, cfg.target_modules)  # ModelError: exit 2
    manifest = srlora.read_manifest(ckpt)
    model, controller = srlora.wrap(bundle.make(rec["seed"]),
                                    srlora.SRLoRAConfig.from_dict(manifest["config"]))
    srlora.load_checkpoint(ckpt, model=model, controller=controller, restore_rng=False)
    if args.format == "peft":
        res = srlora.export_adapter(model, controller, args.out, rank=args.rank,
                                    energy=args.energy)
        print(f"wrote a PEFT LoRA adapter to {args.out} (max rank {res.rank}; relative error "
              f"{res.error:.2e}); load it with PeftModel.from_pretrained(<original "
              f"{bundle.name}>, {args.out!r})")
    else:
        srlora.save_merged(model, controller, args.out)
        print(f"wrote the merged model to {args.out}")
    if bundle.tokenizer is not None:
        bundle.tokenizer.save_pretrained(args.out)
    return 0
