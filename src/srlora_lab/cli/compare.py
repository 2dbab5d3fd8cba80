"""``srlora compare``: LoRA vs PiSSA vs SRLoRA on one model and dataset, several seeds.

Parses flags, checks every input before any training, and calls srlora_lab.experiments.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from . import UsageError

LR_LIKE = {"relora": "lora"}  # no per-method task lr of its own: this one's (ReLoRA starts as LoRA)


def _methods() -> tuple[str, ...]:
    from ..experiments.methods import all_methods

    return all_methods()


def _task_help() -> str:
    from ..experiments.tasks import TASKS

    lines = ["built-in tasks (offline; assets installed on first use) and their defaults:"]
    for t in TASKS.values():
        d = t.defaults
        size = {
            "text": f"max_len={d.get('max_len')}",
            "lm": f"max_len={d.get('max_len')} (tokens per block)",
        }.get(t.kind, f"image_size={d.get('image_size')}")
        lr = d["lr"] if "=" not in d["lr"] else f"({d['lr']})"  # per-method lrs in brackets
        lines.append(
            f"  {t.name:16s} {t.what}\n{'':19s}steps={d['steps']} batch={d['batch_size']} "
            f"r={d['r']} r_target={d['r_target']} seeds={d['seeds']}\n{'':19s}"
            f"lr={lr} head_lr={d.get('head_lr') or 'none'} {size} eval_every={d['eval_every']} "
            f"eval_size={d['eval_size']} max_test={d['max_test'] or 'all'}"
        )
    lines.append(
        "  --dataset FILE   any local CSV/TSV/JSONL with 'text' and 'label' columns (or a "
        "hub dataset name); text defaults as rt-polarity"
    )
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="fine-tune with LoRA, PiSSA and SRLoRA and compare (table, JSON, PNGs)",
        description="Fine-tune the same pretrained model on the same data with each method "
        "(same seeds, batches, steps and LR schedule), then print a table with 95% "
        "intervals over seeds and each method's paired difference against LoRA, and "
        "write results.json and PNG plots.",
        epilog=_task_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--task", default="rt-polarity", help="built-in task (default rt-polarity; see below)")
    a(
        "--model",
        help="minilm | smollm2 | efficientnet-lite0 | a local model folder | a hub id "
        "(default: the task's model)",
    )
    a(
        "--dataset",
        help="a local CSV/TSV/JSONL with text,label columns, or a hub dataset name "
        "(replaces the task's data)",
    )
    a(
        "--methods",
        default="lora,pissa,srlora",
        help="comma list of lora, pissa, srlora, relora, dora, olora, or a variant: srlora:rewarm, "
        "srlora:protect:rewarm, srlora:gamma=0.25, srlora:paper (docs/compare.md)",
    )
    a("--seeds", help="comma list of ints (default per task: 0,1,2)")
    a("--steps", type=int, help="optimizer steps per run (default per task)")
    a("--batch-size", type=int, help="examples per optimizer step (default per task)")
    a(
        "--lr",
        help="learning rate(s): '3e-4', a grid '1e-4,3e-4,1e-3', or per method "
        "'lora=1e-3,srlora=2e-4' (repeat a method for a grid). With several, each "
        "method is reported at its best lr on validation. Default per task",
    )
    a(
        "--head-lr",
        type=float,
        help="lr of the fully trained classification head, the same "
        "for every method (default per task)",
    )
    a("--r", type=int, help="LoRA rank (default per task)")
    a("--lora-alpha", type=float, help="LoRA alpha (default 2*r)")
    a("--r-target", type=int, help="SRLoRA: singular directions to explore (default per task)")
    a("--gamma", type=float, help="SRLoRA: fraction of pairs recomposed per switch (default 0.5)")
    a("--target-modules", help="comma list of module names (default: the model's usual targets)")
    a("--eval-every", type=int, help="eval-curve interval in optimizer steps (default per task)")
    a(
        "--eval-size",
        type=int,
        help="test examples used for the eval curve (default per task; the "
        "final accuracy uses the whole test part)",
    )
    a("--max-train", type=int, help="cap on training examples")
    a("--max-val", type=int, help="cap on validation examples (default 500)")
    a("--max-test", type=int, help="cap on test examples (default per task)")
    a("--max-len", type=int, help="text: max tokens per example (default per task)")
    a("--image-size", type=int, help="images: side in pixels (default 64)")
    a(
        "--schedule",
        choices=("constant", "linear"),
        default="constant",
        help="LR after warm-up: constant (default) or linear decay to 0",
    )
    a("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up (0.1)")
    a("--split-seed", type=int, default=0, help="seed of the train/val/test split (0)")
    a(
        "--loss-threshold",
        type=float,
        help="loss for 'steps to threshold' (default: the worst final smoothed loss of all runs)",
    )
    a("--out", help="output folder (default runs/compare-<task>)")
    a(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 can be faster on a busy machine)",
    )
    a(
        "--save-every",
        type=int,
        default=0,
        help="checkpoint each run every N optimizer steps (and at its end) under "
        "OUT/checkpoints/; 0 = none (default)",
    )
    a(
        "--resume",
        action="store_true",
        help="continue the comparison in --out: keep its finished runs, continue an unfinished "
        "run from its last checkpoint",
    )
    a("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _ints(s: str, flag: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected a comma list of integers, got {s!r}") from None
    if not v:
        raise UsageError(f"{flag}: empty")
    return v


def parse_lrs(spec: str, methods: list[str], default: str, bases: dict | None = None) -> dict:
    """``--lr`` into {method: [lr, ...]}; methods not named take the plain values, else the
    task default for that method's base method (``bases``: name -> base method)."""
    bases = bases or {m: m for m in methods}
    known = _methods() + tuple(m for m in methods if m not in _methods())

    def parse(s: str, flag: str):
        shared, per = [], {}
        for item in [x.strip() for x in s.split(",") if x.strip()]:
            m, _, v = item.rpartition("=")
            try:
                lr = float(v)
            except ValueError:
                raise UsageError(f"{flag}: {v!r} is not a number") from None
            if not (math.isfinite(lr) and lr > 0):
                raise UsageError(f"{flag}: learning rates must be positive, got {v!r}")
            if m and m not in known:
                raise UsageError(f"{flag}: unknown method {m!r} (methods: {', '.join(known)})")
            (per.setdefault(m, []) if m else shared).append(lr)
        return shared, per

    d_shared, d_per = parse(default, "default lr")
    shared, per = parse(spec, "--lr") if spec else ([], {})
    if spec and not shared and not per:
        raise UsageError("--lr: empty")
    out = {}
    for m in methods:
        base = bases.get(m, m)
        v = (
            per.get(m)
            or shared
            or d_per.get(m)
            or d_per.get(base)
            or d_per.get(LR_LIKE.get(base, base))
            or d_shared
        )
        out[m] = sorted(set(v))
    return out


def _check_out(out: str) -> None:
    """Refuse an output folder that cannot be created or written, without creating anything
    (the folder is made only once every input has been checked: see :func:`make_out`)."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {out!r}: not writable (it exists and is not a folder)")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out!r}: not writable ({parent!r} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out!r}: not writable (no write permission in {parent!r})")


def check_new_out(out: str) -> None:
    """Without --resume: refuse an --out that already holds a run (its results.json or
    checkpoints would be overwritten), naming the ways out."""
    held = [p for p in ("results.json", "checkpoints") if os.path.exists(os.path.join(out, p))]
    if held:
        raise UsageError(
            f"--out {out!r} already holds a run ({held[0]}); nothing was written. "
            "Pass --resume to continue it, or choose another --out"
        )


def make_out(out: str) -> None:
    """Create the output folder (after every input check)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out!r}: not writable ({e.strerror or e})") from None


def check_resumable(out: str) -> None:
    """``--resume``: an existing results.json in ``out`` must be a readable srlora results file."""
    from . import load_results

    path = os.path.join(out, "results.json")
    if os.path.exists(path):
        load_results(path, "--resume")


def build_config(args):
    """Resolve flags against the task defaults into a CompareConfig; checks all of them."""
    from ..experiments.compare import CompareConfig
    from ..experiments.tasks import CUSTOM_DEFAULTS, TASKS

    if args.dataset:
        task_name, d = ("custom", CUSTOM_DEFAULTS)
    elif args.task not in TASKS:
        raise UsageError(
            f"--task {args.task!r}: unknown task; built-in tasks: "
            f"{', '.join(TASKS)} (or give --dataset)"
        )
    else:
        task_name, d = args.task, TASKS[args.task].defaults
    from ..experiments.methods import MethodError, parse_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError(
            f"--methods: no method in {args.methods!r}; choose from {', '.join(_methods())}"
        )
    variants = {}
    for m in methods:
        try:
            name, base, config = parse_method(m)
        except MethodError as e:
            raise UsageError(f"--methods: {e}") from None
        if "/" in name:
            raise UsageError(f"--methods: {name!r}: a method name cannot hold '/'")
        variants[name] = {"method": base, "config": config}
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods: a method is named twice: {args.methods!r}")
    pick = lambda v, key: d.get(key) if v is None else v
    steps, bs = pick(args.steps, "steps"), pick(args.batch_size, "batch_size")
    for flag, v, lo in (
        ("--steps", steps, 1),
        ("--batch-size", bs, 1),
        ("--r", args.r, 1),
        ("--eval-every", args.eval_every, 1),
        ("--eval-size", args.eval_size, 1),
        ("--max-train", args.max_train, 1),
        ("--max-val", args.max_val, 1),
        ("--max-test", args.max_test, 1),
        ("--max-len", args.max_len, 2),
        ("--image-size", args.image_size, 16),
    ):
        if v is not None and v < lo:
            raise UsageError(f"{flag}: must be >= {lo}, got {v}")
    if getattr(args, "save_every", 0) < 0:
        raise UsageError(f"--save-every: must be >= 0, got {args.save_every}")
    if args.head_lr is not None and not (math.isfinite(args.head_lr) and args.head_lr > 0):
        raise UsageError(f"--head-lr: must be positive, got {args.head_lr}")
    if not 0.0 <= args.warmup < 1.0:
        raise UsageError(f"--warmup: must be in [0, 1), got {args.warmup}")
    if args.split_seed < 0:
        raise UsageError(f"--split-seed: must be >= 0, got {args.split_seed}")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise UsageError(f"--lora-alpha: must be positive, got {args.lora_alpha}")
    for flag, v in (
        ("--gamma", args.gamma),
        ("--loss-threshold", getattr(args, "loss_threshold", None)),
    ):
        if v is not None and not math.isfinite(v):
            raise UsageError(f"{flag}: must be a finite number, got {v}")
    if getattr(args, "loss_threshold", None) is not None and args.loss_threshold <= 0:
        raise UsageError(f"--loss-threshold: must be positive, got {args.loss_threshold}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: must be >= 1, got {args.threads}")
    r = pick(args.r, "r")
    seeds = _ints(args.seeds or d["seeds"], "--seeds")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: a seed is named twice: {seeds}")
    cfg = CompareConfig(
        task=task_name,
        methods=methods,
        seeds=seeds,
        lrs=parse_lrs(args.lr, methods, d["lr"], {m: v["method"] for m, v in variants.items()}),
        variants={m: v for m, v in variants.items() if m != v["method"] or v["config"]},
        steps=steps,
        batch_size=bs,
        r=r,
        lora_alpha=args.lora_alpha
        if args.lora_alpha is not None
        else (d["lora_alpha"] if args.r is None else 2.0 * r),
        r_target=pick(args.r_target, "r_target"),
        gamma=pick(args.gamma, "gamma"),
        eval_every=min(pick(args.eval_every, "eval_every"), steps),
        eval_size=args.eval_size or d.get("eval_size", 300),
        out=args.out or os.path.join("runs", f"compare-{task_name}"),
        head_lr=args.head_lr if args.head_lr is not None else d.get("head_lr"),
        target_modules=[t.strip() for t in args.target_modules.split(",") if t.strip()]
        if args.target_modules
        else None,
        max_len=pick(args.max_len, "max_len") or 64,
        image_size=pick(args.image_size, "image_size") or 64,
        warmup=args.warmup,
        schedule=args.schedule,
        split_seed=args.split_seed,
        max_train=pick(args.max_train, "max_train"),
        max_val=pick(args.max_val, "max_val"),
        max_test=pick(args.max_test, "max_test"),
        model=args.model or (TASKS[task_name].model if task_name in TASKS else "minilm"),
        dataset=args.dataset or "",
        save_every=getattr(args, "save_every", 0) or 0,
    )
    if args.target_modules is not None and not cfg.target_modules:
        raise UsageError("--target-modules: empty")
    import srlora
    from srlora_lab.experiments.runner import task_settings

    if any(v["method"] == "full" for v in variants.values()) and cfg.save_every:
        raise UsageError(
            "--save-every: full fine-tuning runs do not checkpoint; drop "
            "--save-every or the method 'full'"
        )
    for m in methods:  # the library's own validation of r, r_target, gamma, ...
        v = variants[m]
        if v["method"] == "full":  # no adapter: nothing for SRLoRAConfig to check
            continue
        try:
            srlora.SRLoRAConfig(
                **{
                    "method": v["method"],
                    **task_settings(
                        v["method"],
                        {
                            "r": cfg.r,
                            "lora_alpha": cfg.lora_alpha,
                            "r_target": cfg.r_target,
                            "gamma": cfg.gamma,
                            "total_steps": cfg.steps,
                        },
                    ),
                    **v["config"],
                }
            )
        except ValueError as e:
            raise UsageError(str(e).replace("SRLoRAConfig.", "--").replace("_", "-")) from None
    return cfg


def prepare(cfg):
    """Load data and model and check the adapter fits the model, all before training."""
    from ..experiments import tasks
    from ..experiments.assets import AssetError
    from ..experiments.models import ModelError, load_model

    try:
        if cfg.dataset:
            data = tasks.load_dataset_arg(cfg.dataset)
        else:
            data = tasks.TASKS[cfg.task].loader()
        sp = tasks.split(
            data,
            cfg.split_seed,
            max_train=cfg.max_train,
            max_val=cfg.max_val,
            max_test=cfg.max_test,
        )
        bundle = load_model(cfg.model, data.kind, len(data.label_names), cfg.target_modules)
        enc = bundle.encode(data, max_len=cfg.max_len, image_size=cfg.image_size)
    except (tasks.DataError, ModelError, AssetError) as e:
        raise UsageError(str(e)) from None
    _check_adapter(cfg, bundle)
    meta = {
        "data": {
            "source": data.source,
            "kind": data.kind,
            "labels": data.label_names,
            "examples": len(data),
        },
        "model": {
            "name": bundle.name,
            "target_modules": cfg.target_modules or bundle.target_modules,
            "trained_head": bundle.head,
            **bundle.info,
        },
    }
    return bundle, enc, sp, meta


def _check_adapter(cfg, bundle) -> None:
    import srlora

    bases = [cfg.base_method(m) for m in cfg.methods]
    method = "srlora" if "srlora" in bases else ("pissa" if "pissa" in bases else "lora")
    try:
        srlora.wrap(
            bundle.make(0),
            srlora.SRLoRAConfig(
                method=method,
                r=cfg.r,
                lora_alpha=cfg.lora_alpha,
                r_target=cfg.r_target,
                gamma=cfg.gamma,
                total_steps=cfg.steps,
                modules_to_save=bundle.head,
                target_modules=cfg.target_modules or bundle.target_modules,
            ),
        )
    except (srlora.SRLoRAError, ValueError) as e:
        what = (
            "the adapter does not fit"
            if set(bases) != {"full"}
            else "--target-modules (the modules whose change full fine-tuning's diagnostics read) "
            "do not fit"
        )
        raise UsageError(f"{what} model {bundle.name!r}: {e}") from None


def run(args) -> int:
    from ..experiments import plots, report
    from ..experiments.compare import run_compare

    cfg = build_config(args)
    _check_out(cfg.out)
    if args.resume:
        check_resumable(cfg.out)
    else:
        check_new_out(cfg.out)  # a finished run is never overwritten
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    bundle, enc, sp, meta = prepare(cfg)
    make_out(cfg.out)  # only now: a refused input leaves no folder behind
    n_runs = sum(len(cfg.lrs[m]) for m in cfg.methods) * len(cfg.seeds)
    print(
        f"srlora compare: {cfg.task} | {bundle.name} | {sp.info['train']} train / "
        f"{sp.info['val']} val / {sp.info['test']} test | {n_runs} runs of {cfg.steps} steps "
        f"x {cfg.batch_size} | results in {cfg.out}",
        flush=True,
    )
    try:
        results = run_compare(
            cfg, bundle, enc, sp, meta, progress=not args.no_progress, resume=args.resume
        )
    except ValueError as e:
        if str(e).startswith("--resume"):
            raise UsageError(str(e)) from None
        raise
    except KeyboardInterrupt:
        import json

        with open(os.path.join(cfg.out, "results.json")) as f:
            partial = json.load(f)
        print(
            f"\ninterrupted: {len(partial['runs'])} finished run(s) kept in "
            f"{os.path.join(cfg.out, 'results.json')}",
            file=sys.stderr,
        )
        if partial["runs"]:
            print(report.format_report(partial, args.loss_threshold))
        raise
    if args.loss_threshold is not None:  # results.json's paired differences at this threshold
        from ..experiments.compare import write_json

        results["paired_vs_lora"] = report.paired_vs_lora(results, args.loss_threshold)
        write_json(os.path.join(cfg.out, "results.json"), results)
    text = report.format_report(results, args.loss_threshold)
    with open(os.path.join(cfg.out, "table.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    from ..experiments import diagnostics_plots

    for p in plots.write_all(results, cfg.out) + diagnostics_plots.write(results, cfg.out):
        print(f"wrote {p}")
    print(f"wrote {os.path.join(cfg.out, 'results.json')} ({results['wall_time_s']:.0f} s)")
    return 0
