"""``srlora export RUN_DIR --format peft|merged --out DIR``: a plain PEFT adapter against the
ORIGINAL base model, or the merged model in the base model's own format, from the last
checkpoint of a ``srlora train`` (or ``compare --save-every``) run."""
from __future__ import annotations

import argparse
import json
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


def run(args) -> int:
    import srlora
    from ..experiments import checkpointing
    from ..experiments.compare import CompareConfig, run_dir
    from ..experiments.models import ModelError, load_model

    path = os.path.join(args.run_dir, "results.json")
    if not os.path.isfile(path):
        raise UsageError(f"{args.run_dir!r}: no results.json; not a srlora run folder")
    if args.format == "merged" and (args.rank or args.energy):
        raise UsageError("--rank/--energy apply to --format peft")
    with open(path) as f:
        results = json.load(f)
    cfg = CompareConfig(**results["config"])
    rec = pick_run(results, args.run)
    ckpt = checkpointing.latest(run_dir(cfg, rec["method"], rec["lr"], rec["seed"]))
    if ckpt is None:
        raise UsageError(f"run {rec['method']},{rec['seed']},{rec['lr']:g} has no checkpoint; "
                         "train with save_every (srlora train always saves the final step)")
    try:
        bundle = load_model(cfg.model, results["data"]["kind"], len(results["data"]["labels"]),
                            cfg.target_modules)
    except ModelError as e:
        raise UsageError(str(e)) from None
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
