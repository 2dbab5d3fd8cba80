"""One training run: a plain loop, the same for every method.

Methods differ ONLY in the adapter: for a given seed every method gets the same base weights,
the same seeded head initialisation, the same batches in the same order, the same number of
optimizer steps, the same optimizer (AdamW, no weight decay, gradient clipping at 1.0) and the
same learning-rate schedule (linear warm-up over ``warmup`` of the steps, then constant, or
linear decay to zero with ``schedule="linear"``). The adapter is built with ``srlora.wrap`` and
driven with ``controller.attach(optimizer)``, exactly as a user would.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import srlora

from .models import Bundle

Callback = Callable[[int, torch.nn.Module, "srlora.SRLoRAController", torch.optim.Optimizer,
                     torch.optim.lr_scheduler.LRScheduler], None]


def lr_factor(step: int, steps: int, warmup: float, schedule: str) -> float:
    """LR multiplier for the optimizer step with index ``step`` (0-based)."""
    w = max(1, int(round(warmup * steps))) if warmup > 0 else 0
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - w))


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Positions into the training set for each step: seeded epochs, each a fresh permutation."""
    rng = np.random.default_rng(seed)
    pool, out = np.empty(0, dtype=np.int64), []
    for _ in range(steps):
        while len(pool) < batch_size:
            pool = np.concatenate([pool, rng.permutation(n)])
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return out


@torch.no_grad()
def evaluate(bundle: Bundle, model, enc, idx: np.ndarray, batch_size: int = 64) -> dict:
    """Accuracy and mean loss on the examples ``idx`` (sorted by length to cut padding)."""
    was_training = model.training
    model.eval()
    order = np.asarray(idx)[np.argsort(enc.lengths[idx], kind="stable")]
    correct, loss_sum = 0, 0.0
    for k in range(0, len(order), batch_size):
        inputs, labels = enc.batch(order[k:k + batch_size])
        logits = bundle.logits(model, inputs).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return {"accuracy": correct / len(order), "loss": loss_sum / len(order)}


def _switch_log(controller) -> list[dict]:
    names = [L.name for L in controller.layers]
    return [{"step": e["step"], "modules": [names[i] for i in e["modules"]], "slots": e["slots"],
             "directions": e["directions"], "scores": e["scores"]} for e in controller.history]


def run_one(bundle: Bundle, enc, split, *, method: str, seed: int, lr: float, steps: int,
            batch_size: int, r: int = 8, lora_alpha: float = 16.0, r_target: int = 32,
            gamma: float = 0.5, target_modules: Optional[list[str]] = None,
            eval_every: int = 25, eval_size: Optional[int] = None, warmup: float = 0.1,
            schedule: str = "constant", clip: float = 1.0, head_lr: Optional[float] = None,
            eval_val: bool = True, callback: Optional[Callback] = None, progress: bool = True,
            desc: str = "", checkpoint_dir: Optional[str] = None, save_every: int = 0,
            resume_from: Optional[str] = None, config: Optional[dict] = None) -> dict:
    """Train one adapter and return its record (losses per optimizer step, curves, switches).

    ``split`` has ``train``/``val``/``test`` index arrays into ``enc``. The eval curve is taken
    on the first ``eval_size`` test examples every ``eval_every`` steps; the final accuracy on the
    whole test part, and (``eval_val``) the validation accuracy used to pick the learning rate.
    ``lr`` drives the LoRA factors; the fully trained head (``modules_to_save``) uses ``head_lr``
    (default ``lr``), so with a fixed ``head_lr`` methods differ only in the adapter.
    ``callback(step, model, controller, optimizer, scheduler)`` runs after every optimizer step.
    With ``checkpoint_dir`` and ``save_every`` a checkpoint is written every ``save_every`` steps;
    ``resume_from`` (a checkpoint of this same run) continues it exactly where it stopped.
    ``config`` holds further SRLoRAConfig fields (e.g. ``{"optimizer_state": "keep"}`` or
    ``{"extra_lora_kwargs": {"use_dora": True}}``), merged into the config and recorded.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # LoRA's random A init draws from the global generator
    base = bundle.make(seed)
    cfg = srlora.SRLoRAConfig(method=method, r=r, lora_alpha=lora_alpha, r_target=r_target,
                              gamma=gamma, total_steps=steps,
                              target_modules=target_modules or bundle.target_modules,
                              modules_to_save=bundle.head, **(config or {}))
    model, controller = srlora.wrap(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    lora_ids = {id(p) for L in controller.layers for p in (L.lora_A, L.lora_B)}
    groups = [{"params": [p for p in params if id(p) in lora_ids], "lr": lr},
              {"params": [p for p in params if id(p) not in lora_ids], "lr": head_lr or lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    controller.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, schedule))
    curve_idx = split.test[:eval_size] if eval_size else split.test
    order = batch_order(len(split.train), steps, batch_size, seed)
    torch.manual_seed(seed)  # dropout draws: identical for every method
    setup_s = time.perf_counter() - t0

    losses, curve, start = [], [], 1
    if resume_from:
        from . import checkpointing
        saved = checkpointing.load(resume_from, model, controller, optimizer, scheduler)
        losses, curve = list(saved.get("losses", [])), list(saved.get("curve", []))
        start = controller.global_step + 1
        if len(losses) != controller.global_step:
            raise ValueError(f"{resume_from}: holds {len(losses)} losses for step "
                             f"{controller.global_step}; not a checkpoint of this runner")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start - 1, desc=desc or f"{method} seed={seed} lr={lr:g}",
                   leave=False, dynamic_ncols=True, disable=None)  # None: off when not a TTY
    t1 = time.perf_counter()
    eval_s = 0.0
    for step in range(start, steps + 1):
        inputs, labels = enc.batch(split.train[order[step - 1]])
        bundle.train_mode(model)
        loss = F.cross_entropy(bundle.logits(model, inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()  # the controller's hook runs here: importance, step count, switch
        scheduler.step()
        losses.append(float(loss.item()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{method} seed={seed} lr={lr:g}: loss is "
                                     f"{losses[-1]} at step {step}")
        if step % eval_every == 0 or step == steps:
            te = time.perf_counter()
            ev = evaluate(bundle, model, enc, curve_idx)
            curve.append({"step": step, "accuracy": ev["accuracy"], "loss": ev["loss"]})
            eval_s += time.perf_counter() - te
        if callback is not None:
            callback(step, model, controller, optimizer, scheduler)
        if checkpoint_dir and save_every and (step % save_every == 0 or step == steps):
            from . import checkpointing
            checkpointing.save(checkpoint_dir, step, model, controller, optimizer, scheduler,
                               {"losses": losses, "curve": curve})
        if bar is not None:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", sw=controller.num_switches)
            bar.update(1)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t1 - eval_s
    test = evaluate(bundle, model, enc, split.test)
    val = evaluate(bundle, model, enc, split.val) if eval_val else {"accuracy": None,
                                                                      "loss": None}
    return {
        "method": method, "seed": seed, "lr": lr, "head_lr": head_lr or lr, "steps": controller.global_step,
        "config": dict(config or {}),
        "final_accuracy": test["accuracy"], "final_test_loss": test["loss"],
        "val_accuracy": val["accuracy"], "val_loss": val["loss"],
        "train_loss": losses, "eval_curve": curve,
        "switch_steps": [e["step"] for e in controller.history], "switches": _switch_log(controller),
        "num_switches": controller.num_switches, "pointers": controller.pointers,
        "wall_time_s": time.perf_counter() - t0, "train_time_s": train_s, "eval_time_s": eval_s,
        "setup_time_s": setup_s,
        "trainable_params": sum(p.numel() for p in params),
        "adapted_modules": len(controller.layers),
    }
