"""One training run: a plain loop, the same for every method.

Methods differ ONLY in the adapter: for a given seed every method gets the same base weights,
the same seeded head initialisation, the same batches in the same order, the same number of
optimizer steps, the same optimizer (AdamW, no weight decay, gradient clipping at 1.0) and the
same learning-rate schedule (linear warm-up over ``warmup`` of the steps, then constant, or
linear decay to zero with ``schedule="linear"``). The adapter is built with ``srlora.wrap`` and
driven with ``controller.attach(optimizer)``, exactly as a user would.

A causal-LM bundle (``bundle.kind == "lm"``) has no head: its loss is the mean next-token
cross-entropy over the real (unpadded) tokens of a batch of token blocks, and the record's
"accuracy" is next-token accuracy, beside the held-out perplexity (exp of the mean token loss).
The split's indices are then documents; each run trains and evaluates on their blocks.

Every record ends with ``diagnostics`` (see :mod:`.diagnostics`): the fused pairs of SRLoRA and
the singular spectrum of each module's total change, for every method.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import srlora

from . import diagnostics
from .fingerprint import machine_fingerprint
from .models import Bundle

Callback = Callable[
    [
        int,
        torch.nn.Module,
        "srlora.SRLoRAController",
        torch.optim.Optimizer,
        torch.optim.lr_scheduler.LRScheduler,
    ],
    None,
]


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


def _units(bundle: Bundle, enc, idx: np.ndarray) -> np.ndarray:
    """What a split part trains or evaluates on: its examples, or (LM) its documents' blocks."""
    return enc.blocks_of(idx) if bundle.kind == "lm" else np.asarray(idx)


def loss_sums(bundle: Bundle, model, inputs, labels) -> tuple[torch.Tensor, int, int]:
    """(summed loss, correct predictions, predictions) of one batch: per example for a
    classifier; per predicted token for a causal LM (position t predicts token t+1; padding,
    labelled -100, is left out)."""
    logits = bundle.logits(model, inputs).float()
    if bundle.kind == "lm":
        logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        keep = labels != -100
        logits, labels = logits[keep], labels[keep]
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return loss, int((logits.argmax(-1) == labels).sum()), int(labels.numel())


@torch.no_grad()
def evaluate(bundle: Bundle, model, enc, idx: np.ndarray, batch_size: int = 64) -> dict:
    """Accuracy and mean loss on the examples ``idx`` (sorted by length to cut padding); for a
    causal LM, ``idx`` are blocks, both are per token, and ``perplexity`` is exp(loss)."""
    was_training = model.training
    model.eval()
    if bundle.kind == "lm":
        batch_size = min(batch_size, 16)  # logits are tokens x vocabulary
    order = np.asarray(idx)[np.argsort(enc.lengths[idx], kind="stable")]
    correct, loss_sum, n = 0, 0.0, 0
    for k in range(0, len(order), batch_size):
        inputs, labels = enc.batch(order[k : k + batch_size])
        loss, c, m = loss_sums(bundle, model, inputs, labels)
        loss_sum, correct, n = loss_sum + loss.item(), correct + c, n + m
    model.train(was_training)
    out = {"accuracy": correct / n, "loss": loss_sum / n}
    if bundle.kind == "lm":
        out["perplexity"] = math.exp(out["loss"])
    return out


def _switch_log(controller) -> list[dict]:
    names = [L.name for L in controller.layers]

    def log(e: dict) -> dict:
        out = {**e, "modules": [names[i] for i in e["modules"]]}
        if "refreshed" in e:
            out["refreshed"] = [names[i] for i in e["refreshed"]]
        return out

    return [log(e) for e in controller.history]


def _switch_fields(controller) -> dict:
    return {
        "switch_steps": [e["step"] for e in controller.history],
        "switches": _switch_log(controller),
        "num_switches": controller.num_switches,
        "pointers": controller.pointers,
    }


def full_model(
    bundle: Bundle, model: torch.nn.Module, lr: float, head_lr: float, target_modules: list[str]
):
    """Full fine-tuning's side of a run: every parameter of ``model`` trains (at ``lr``; the
    task's head at ``head_lr``, as the adapters' head). Returns (model, None, param groups,
    {module name: its weight before training} for the modules adapters would target), the
    last for the spectrum of the change (diagnostics.collect_full)."""
    head = tuple(bundle.head or ())
    is_head = lambda n: any(n == h or n.startswith(h + ".") or f".{h}." in f".{n}" for h in head)
    for p in model.parameters():
        p.requires_grad_(True)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not is_head(n)], "lr": lr},
        {"params": [p for n, p in named if is_head(n)], "lr": head_lr},
    ]
    suffixes = tuple(target_modules or ())
    initial = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() >= 2
        and not is_head(n)
        and any(n == t or n.endswith("." + t) for t in suffixes)
    }
    return model, None, groups, initial


FULL = "full"  # the full fine-tuning yardstick: every weight trained, no adapter


def adapter_config(
    bundle: Bundle,
    *,
    method: str,
    r: int,
    lora_alpha: float,
    r_target: int,
    gamma: float,
    steps: int,
    target_modules: Optional[list[str]] = None,
    config: Optional[dict] = None,
) -> "srlora.SRLoRAConfig":
    """The SRLoRAConfig of one run: the task's settings, then the method's own fields (``config``:
    r, gamma, selection, ...), which override them. Raises as SRLoRAConfig does on a bad field."""
    return srlora.SRLoRAConfig(
        **{
            "method": method,
            **task_settings(
                method,
                {
                    "r": r,
                    "lora_alpha": lora_alpha,
                    "r_target": r_target,
                    "gamma": gamma,
                    "total_steps": steps,
                },
            ),
            "target_modules": target_modules or bundle.target_modules,
            "modules_to_save": bundle.head or None,
            **(config or {}),
        }
    )


def task_settings(method: str, settings: dict) -> dict:
    """A task's settings shared by every method (r, gamma, ...), less those a preset method sets
    (``srlora.config.PRESETS``: relora's gamma 1) where the task leaves them at the library's
    default; a task value other than the default still reaches SRLoRAConfig, which refuses it."""
    from srlora.config import PRESETS

    fields = srlora.SRLoRAConfig.__dataclass_fields__
    preset = PRESETS.get(method, {})
    return {k: v for k, v in settings.items() if not (k in preset and v == fields[k].default)}


def run_one(
    bundle: Bundle,
    enc,
    split,
    *,
    method: str,
    seed: int,
    lr: float,
    steps: int,
    batch_size: int,
    r: int = 8,
    lora_alpha: float = 16.0,
    r_target: int = 32,
    gamma: float = 0.5,
    target_modules: Optional[list[str]] = None,
    eval_every: int = 25,
    eval_size: Optional[int] = None,
    warmup: float = 0.1,
    schedule: str = "constant",
    clip: float = 1.0,
    head_lr: Optional[float] = None,
    eval_val: bool = True,
    callback: Optional[Callback] = None,
    progress: bool = True,
    desc: str = "",
    checkpoint_dir: Optional[str] = None,
    save_every: int = 0,
    resume_from: Optional[str] = None,
    config: Optional[dict] = None,
) -> dict:
    """Train one adapter and return its record (losses per optimizer step, curves, switches).

    ``split`` has ``train``/``val``/``test`` index arrays into ``enc`` (for a causal LM: into its
    documents; the run uses their blocks). The eval curve is taken on the first ``eval_size``
    test examples (LM: blocks) every ``eval_every`` steps; the final accuracy on the whole test
    part, and (``eval_val``) the validation accuracy used to pick the learning rate.
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
    if method == FULL:
        if config:
            raise ValueError(f"full fine-tuning takes no adapter settings, got {sorted(config)}")
        model, controller, groups, initial = full_model(
            bundle, base, lr, head_lr or lr, target_modules or bundle.target_modules
        )
        params = [p for g in groups for p in g["params"]]
    else:
        cfg = adapter_config(
            bundle,
            method=method,
            r=r,
            lora_alpha=lora_alpha,
            r_target=r_target,
            gamma=gamma,
            steps=steps,
            target_modules=target_modules,
            config=config,
        )
        model, controller = srlora.wrap(base, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        lora_ids = {id(p) for L in controller.layers for p in (L.lora_A, L.lora_B)}
        groups = [
            {"params": [p for p in params if id(p) in lora_ids], "lr": lr},
            {"params": [p for p in params if id(p) not in lora_ids], "lr": head_lr or lr},
        ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    if controller is not None:
        controller.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, schedule)
    )
    train, test = _units(bundle, enc, split.train), _units(bundle, enc, split.test)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"no {'training' if len(train) == 0 else 'test'} examples")
    curve_idx = test[:eval_size] if eval_size else test
    order = batch_order(len(train), steps, batch_size, seed)
    torch.manual_seed(seed)  # dropout draws: identical for every method
    setup_s = time.perf_counter() - t0

    losses, curve, start = [], [], 1
    if resume_from and controller is None:
        raise ValueError("full fine-tuning runs do not checkpoint (resume needs an adapter)")
    if resume_from:
        from . import checkpointing

        saved = checkpointing.load(resume_from, model, controller, optimizer, scheduler)
        losses, curve = list(saved.get("losses", [])), list(saved.get("curve", []))
        start = controller.global_step + 1
        if len(losses) != controller.global_step:
            raise ValueError(
                f"{resume_from}: holds {len(losses)} losses for step "
                f"{controller.global_step}; not a checkpoint of this runner"
            )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps,
            initial=start - 1,
            desc=desc or f"{method} seed={seed} lr={lr:g}",
            leave=False,
            dynamic_ncols=True,
            disable=None,
        )  # None: off when not a TTY
    t1 = time.perf_counter()
    eval_s = 0.0
    for step in range(start, steps + 1):
        inputs, labels = enc.batch(train[order[step - 1]])
        bundle.train_mode(model)
        loss_sum, _, n_pred = loss_sums(bundle, model, inputs, labels)
        loss = loss_sum / max(n_pred, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if controller is not None:
            controller.observe_loss(loss)  # switch_schedule="adaptive": the plateau test
        optimizer.step()  # the controller's hook runs here: importance, step count, switch
        scheduler.step()
        losses.append(float(loss.item()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(
                f"{method} seed={seed} lr={lr:g}: loss is {losses[-1]} at step {step}"
            )
        if step % eval_every == 0 or step == steps:
            te = time.perf_counter()
            ev = evaluate(bundle, model, enc, curve_idx)
            curve.append({"step": step, "accuracy": ev["accuracy"], "loss": ev["loss"]})
            eval_s += time.perf_counter() - te
        if callback is not None:
            callback(step, model, controller, optimizer, scheduler)
        if (
            checkpoint_dir
            and save_every
            and controller is not None
            and (step % save_every == 0 or step == steps)
        ):
            from . import checkpointing

            checkpointing.save(
                checkpoint_dir,
                step,
                model,
                controller,
                optimizer,
                scheduler,
                {"losses": losses, "curve": curve},
            )
        if bar is not None:
            bar.set_postfix(
                loss=f"{np.mean(losses[-10:]):.3f}",
                sw=controller.num_switches if controller is not None else 0,
            )
            bar.update(1)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t1 - eval_s
    test_ev = evaluate(bundle, model, enc, test)
    val = (
        evaluate(bundle, model, enc, _units(bundle, enc, split.val))
        if eval_val
        else {"accuracy": None, "loss": None, "perplexity": None}
    )
    td = time.perf_counter()
    diag = (
        diagnostics.collect(controller)
        if controller is not None
        else diagnostics.collect_full(model, initial)
    )
    diag_s = time.perf_counter() - td
    lm = (
        {
            "final_perplexity": test_ev["perplexity"],
            "val_perplexity": val["perplexity"],
            "train_blocks": len(train),
            "test_blocks": len(test),
        }
        if bundle.kind == "lm"
        else {}
    )
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        "head_lr": head_lr or lr,
        "steps": len(losses),
        "config": dict(config or {}),
        "final_accuracy": test_ev["accuracy"],
        "final_test_loss": test_ev["loss"],
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "train_loss": losses,
        "eval_curve": curve,
        **(
            _switch_fields(controller)
            if controller is not None
            else {"switch_steps": [], "switches": [], "num_switches": 0, "pointers": []}
        ),
        "wall_time_s": time.perf_counter() - t0,
        "train_time_s": train_s,
        "eval_time_s": eval_s,
        "setup_time_s": setup_s,
        "diagnostics_time_s": diag_s,
        "trainable_params": sum(p.numel() for p in params),
        "fingerprint": machine_fingerprint(device=str(next(model.parameters()).device.type)),
        "adapted_modules": len(controller.layers) if controller is not None else len(initial),
        **lm,
        "diagnostics": diag,
    }
