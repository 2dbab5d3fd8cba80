"""``srlora bench``: SRLoRA against PEFT LoRA / PiSSA in one run (see docs/benchmarks.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import UsageError


def register(subparsers) -> None:
    from ..bench import SHAPES, BenchOptions

    d = BenchOptions()
    p = subparsers.add_parser(
        "bench",
        help="time SRLoRA against PEFT LoRA and PiSSA (step, set-up, switch, memory)",
        description="Interleaved step timing of PEFT LoRA vs SRLoRA in one process, PEFT PiSSA "
        "init vs srlora.wrap, switch cost, peak memory (one child process per "
        "method) and SVD accuracy; prints a markdown table with pass/fail per target.",
    )
    p.add_argument(
        "--shape",
        default=d.shape,
        choices=sorted(SHAPES),
        help="model shape (llama-1b needs --device cuda; tiny is for smoke tests)",
    )
    p.add_argument("--device", default=d.device, choices=("cpu", "cuda"))
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per model")
    p.add_argument("--blocks", type=int, default=d.blocks, help="timed blocks")
    p.add_argument(
        "--steps-per-block",
        type=int,
        default=d.steps_per_block,
        help="interleaved steps per model in each block",
    )
    p.add_argument("--r-target", type=int, default=None, help="override the shape's r_target")
    p.add_argument("--batch", type=int, default=None, help="override the shape's batch size")
    p.add_argument("--seq", type=int, default=None, help="override the shape's sequence length")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument(
        "--memory-steps",
        type=int,
        default=d.memory_steps,
        help="training steps in each memory child",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--offload",
        default=d.offload,
        choices=("cpu", "device"),
        help="where SRLoRA keeps its SVD cache, fused-pair ledger and (half "
        "precision) original weights: host memory (the default, offload_device="
        "'cpu') or the model's device (offload_device=None)",
    )
    p.add_argument(
        "--half-fusion",
        default=d.half_fusion,
        choices=("residual", "original", "inplace"),
        help="how a half-precision weight takes a switch (SRLoRAConfig.half_fusion)",
    )
    p.add_argument(
        "--fusion",
        default=d.fusion,
        choices=("weight", "virtual"),
        help="where SRLoRA's (and PiSSA's) change goes: into the base weight (default) "
        "or a frozen low-rank side path, the weight never written "
        "(SRLoRAConfig.fusion)",
    )
    p.add_argument(
        "--setup-variants",
        action="store_true",
        help="also time srlora.wrap with one SVD call per module and with the "
        "other small solver (svd / fp64 eigh)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the full result here")
    p.set_defaults(func=run)


def check_file_out(path: Path, flag: str) -> None:
    """A file to be written at the end: refuse now (before the work) what cannot be written."""
    import os

    if path.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: is a folder; give a file name")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"{flag} {str(path)!r}: not writable ({str(parent)!r} is not a writable folder)"
        )


def run(args) -> int:
    from ..bench import BenchOptions, check_device, format_report, resolve_shape, run_bench

    opts = BenchOptions(
        shape=args.shape,
        device=args.device,
        warmup=args.warmup,
        blocks=args.blocks,
        steps_per_block=args.steps_per_block,
        r_target=args.r_target,
        batch=args.batch,
        seq=args.seq,
        threads=args.threads,
        memory=not args.no_memory,
        memory_steps=args.memory_steps,
        seed=args.seed,
        offload=args.offload,
        half_fusion=args.half_fusion,
        fusion=args.fusion,
        setup_variants=args.setup_variants,
    )
    for flag, v in (
        ("--threads", args.threads),
        ("--r-target", args.r_target),
        ("--batch", args.batch),
        ("--seq", args.seq),
    ):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.json is not None:
        check_file_out(args.json, "--json")
    try:  # every input check before any work starts
        check_device(opts.device)
        resolve_shape(opts)
    except ValueError as e:
        raise UsageError(str(e)) from None
    result = run_bench(opts, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0
