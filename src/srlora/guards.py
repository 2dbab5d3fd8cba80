"""Runtime checks that keep srlora from quietly doing something other than what was asked.

The rule (docs/checkpoints.md, "Nothing silent"): a user's file is never overwritten unless they
ask (``overwrite=True``); what the library cannot do correctly it refuses before any change, with
a message naming the way out; what it does differently than asked it says once, in a warning
naming the field. Each function here is one such check, called by a one- or two-line hook from
the code it guards (export, the controller's step and switch, attach/detach, resume, wrap).
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

# srlora.controller.SRLoRAController; not imported, even under TYPE_CHECKING: the controller
# imports this module (no import cycle under src/)
SRLoRAController = Any


def _switching(ctl: SRLoRAController) -> bool:
    """Does this controller's method switch (srlora; and any other the config lists)?"""
    from . import config

    return ctl.config.method in getattr(config, "SWITCHING", ("srlora",))


# ---------------------------------------------------------------------- files (case 1)
# What ``save_pretrained`` of a transformers model (and ``save_merged`` of a plain module) may
# write: a folder holding any of these already holds a model the merge would overwrite.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model-*-of-*.bin",
)


def existing_files(folder, names: Iterable[str]) -> list[str]:
    """The entries of ``folder`` matching any of ``names`` (glob patterns), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    present = sorted(os.listdir(folder))
    return [f for f in present if any(fnmatch.fnmatchcase(f, pat) for pat in names)]


def check_not_overwriting(folder, names: Iterable[str], overwrite: bool, what: str) -> None:
    """Refuse (``FileExistsError``, before anything is written) to write ``names`` into
    ``folder`` when it already holds one of them, unless ``overwrite``."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"{what}: overwrite must be True or False, got {overwrite!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{what}: {str(folder)!r} exists and is not a folder")
    if overwrite:
        return
    clash = existing_files(folder, names)
    if clash:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise FileExistsError(
            f"{what}: {str(folder / clash[0])!r}{more} already exists; nothing "
            "was written. Choose a new folder, or pass overwrite=True to "
            "replace it"
        )


def move_into(tmp: Path, folder: Path, overwrite: bool, what: str) -> None:
    """Move every file written into ``tmp`` into ``folder`` (created if needed), after checking
    that none of them would replace a file there (unless ``overwrite``); ``tmp`` is removed."""
    names = sorted(os.listdir(tmp))
    check_not_overwriting(folder, names, overwrite, what)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(tmp / name, folder / name)


# ---------------------------------------------------------------------- stepping (cases 3, 15)
def hooked_step(ctl: SRLoRAController) -> None:
    """What the optimizer's step post-hook runs (``attach``): ``ctl.step()``, marked as the
    hook's own call so that :func:`check_not_double_step` lets it through."""
    ctl._in_hook = True
    try:
        ctl.step()
    finally:
        ctl._in_hook = False


def check_not_double_step(ctl: SRLoRAController) -> None:
    """``step()`` called by hand while attached: the hook already steps the controller after
    every ``optimizer.step()``, so this would count the same optimizer step twice (switches at
    half the planned steps). Refused before anything is counted."""
    if ctl.attached and not getattr(ctl, "_in_hook", False):
        raise RuntimeError(
            "SRLoRA: controller.step() called while the controller is attached "
            "to the optimizer; attach() already steps it after every "
            "optimizer.step(), so this would count the optimizer step twice. "
            "Remove the controller.step() call, or call controller.detach() to "
            "step it by hand"
        )


def check_attach(ctl: SRLoRAController, inner) -> None:
    """``attach()`` to a second optimizer while attached to another: refused (a silent switch
    of optimizers would stop the first one's switching and reset the wrong state)."""
    if ctl.attached and ctl.optimizer is not None and ctl.optimizer is not inner:
        raise ValueError(
            f"attach: the controller is already attached to another optimizer "
            f"({type(ctl.optimizer).__name__} at {id(ctl.optimizer):#x}); call "
            "controller.detach() first to move it to this one"
        )


def release(ctl: SRLoRAController) -> None:
    """Remove the step hook without a warning (the Trainer callback, re-attaching to the
    optimizer a resumed Trainer built)."""
    if ctl._hook is not None:
        ctl._hook.remove()
    ctl._hook = None


def planned_steps(ctl: SRLoRAController) -> Optional[list[int]]:
    """The switch steps when the schedule plans them ahead (the fixed one), else None (the
    adaptive schedule, the baselines, or a schedule that cannot be built yet)."""
    if not _switching(ctl):
        return None
    planned = getattr(ctl.schedule, "planned", None)  # a strategy object, where it is one
    if ctl.schedule is not None and planned is None:
        return None  # the adaptive schedule of this tree
    try:
        return ctl.switch_steps if planned is None else planned(ctl.total_steps)
    except ValueError:
        return None


def _override_planned(ctl: SRLoRAController, steps: set) -> None:
    """Make ``steps`` the planned switch steps for the current ``total_steps``."""
    if ctl.schedule is None:  # this tree: the fixed schedule is kept by the controller
        ctl._switch_steps = set(steps)
    else:  # a fixed-schedule strategy caching (total_steps, its steps)
        ctl.schedule._cache = (ctl.total_steps, frozenset(steps))


def remaining_switches(ctl: SRLoRAController) -> list[int]:
    """The planned switch steps after ``global_step`` that can still change something."""
    steps = planned_steps(ctl)
    if not steps:
        return []
    if ctl.config.exhaustion == "stop" and not any(ctl.switchable()):
        return []
    return [t for t in steps if t > ctl.global_step]


def warn_detach(ctl: SRLoRAController) -> None:
    """``detach()`` while switches are still to come: say that they now need ``step()``."""
    if not ctl.attached or not _switching(ctl) or ctl.global_step == 0:
        return
    if planned_steps(ctl) is not None:
        steps = remaining_switches(ctl)
        if not steps:
            return
        more = "..." if len(steps) > 4 else ""
        left = f"{len(steps)} scheduled switch(es) (steps {steps[:4]}{more})"
    else:  # decided as training goes (the adaptive schedule)
        ended = ctl.total_steps is not None and ctl.global_step >= ctl.total_steps
        if (
            getattr(ctl.schedule, "done", False)
            or ended
            or (ctl.config.exhaustion == "stop" and not any(ctl.switchable()))
        ):
            return
        left = "the adaptive schedule's remaining switches"
    warnings.warn(
        f"SRLoRA: detach() at optimizer step {ctl.global_step}: {left} will not "
        "happen unless you call controller.step(optimizer) after each optimizer step "
        "or attach(optimizer) again (importance is no longer tracked either)",
        RuntimeWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------- zeroed gradients (case 4)
def _importance_all_zero(ctl: SRLoRAController) -> bool:
    """Every importance update so far saw only zero gradients (``ibar`` all zero), and at least
    one update happened."""
    imp = ctl.importance
    if imp is None or int(imp.updates) == 0:
        return False
    return not any(bool(g[1].any()) for g in imp._groups if g[1].numel())


def check_zero_gradients(ctl: SRLoRAController, at_switch: bool = False) -> None:
    """Warn once when the importance has only seen all-zero gradients: at the first step and at
    the first switch (later, a switch's reset of the importance zeroes it legitimately).
    ``zero_grad(set_to_none=False)`` before ``step()`` gives this: the switches then choose the
    pairs to fuse by index, not by importance."""
    if "zerograd" in ctl._warned or (ctl.history if at_switch else ctl.global_step != 1):
        return
    if _importance_all_zero(ctl):
        ctl._warn_once(
            "zerograd",
            "SRLoRA: every gradient on the LoRA factors was zero at "
            f"{int(ctl.importance.updates)} importance update(s): no importance is "
            "tracked and switches choose the pairs to fuse by index. Call "
            "controller.step() after optimizer.step() and before zero_grad() (with "
            "zero_grad(set_to_none=False) the gradients are zeros, not None)",
        )


# ---------------------------------------------------------------------- non-finite (case 5)
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _in_range(ctl: SRLoRAController, i: int) -> Optional[torch.Tensor]:
    """For a float16 frozen weight (or side path): whether the switch's writes stay within the
    dtype's range, by a bound (0-dim bool tensor); None for wider dtypes. Weight: ``max|W| +
    s * sum_j max|B_j| max|A_j|`` over the live pairs (the fused ones are among them) ``+ sum_j
    S_j max|U_j| max|Vh_j|`` over the next directions; side path: the largest factor entry."""
    L, st = ctl.layers[i], ctl.modules[i]
    dtype = st.side.Bt.dtype if st.side is not None else L.base_weight.dtype
    if not dtype.is_floating_point or torch.finfo(dtype).max > 1e10:
        return None
    B, A = _local(L.B()).float(), _local(L.A()).float()
    big = torch.finfo(dtype).max
    if st.side is not None:
        return torch.maximum(B.abs().amax(), A.abs().amax()) < big
    k, p, s = ctl.config.r_prime, st.p, abs(L.scaling)
    U, S, Vh = st.U[:, p : p + k], st.S[p : p + k], st.Vh[p : p + k]
    new = (S * U.abs().amax(0) * Vh.abs().amax(1)).sum() if S.numel() else torch.zeros(())
    bound = (
        _local(L.W()).abs().amax().float()
        + s * (B.abs().amax(0) * A.abs().amax(1)).sum()
        + new.to(B.device)
    )
    return bound < big


def _peaks(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """max |x| of each tensor (0 for an empty one, e.g. an FSDP2 rank's empty shard), in one
    foreach op: one fused launch per device and dtype on a GPU. It is non-finite exactly when the
    tensor holds a NaN or Inf; a finite float16 tensor's stays finite (a norm could overflow)."""
    full = [t for t in parts if t.numel()]
    found = iter(torch._foreach_norm(full, ord=float("inf")) if full else ())
    return [next(found) if t.numel() else t.new_zeros(()) for t in parts]


def finite_modules(ctl: SRLoRAController, todo: list[int]) -> list[int]:
    """``todo`` without the modules whose switch would write a non-finite value into the frozen
    weight (or the side path), which the user cannot repair: LoRA factors or importance scores
    holding NaN/Inf, or (float16) a fused weight beyond the dtype's range. They are skipped,
    with a warning naming one; one host sync."""
    if not todo or ctl.importance is None:
        return todo
    parts, fits = [], []
    for i in todo:
        L = ctl.layers[i]
        # the importance state (ibar, ubar) itself, not the scores ibar * ubar: no op to form them
        parts += [_local(L.lora_A), _local(L.lora_B)] + [
            _local(v) for f in "AB" for v in ctl.importance.state_of(ctl.importance_name(i, f))
        ]
        fits.append(_in_range(ctl, i))
    peaks = _peaks(parts)
    dev = peaks[0].device  # one device-side stack, then a single host read below
    peaks = torch.stack([x.to(dev) for x in peaks])  # promoted to the widest dtype
    finite = torch.isfinite(peaks).view(len(todo), 6).all(1)
    fit = torch.stack([finite[k] if f is None else f.to(dev) for k, f in enumerate(fits)])
    ok = torch.stack([finite, fit], 1).to(torch.int32).view(-1)
    if (
        ctl.sharded is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):  # local shards differ: every rank decides alike
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    ok = ok.view(-1, 2).tolist()
    nonfinite = [i for i, (f, _) in zip(todo, ok) if not f]
    overflow = [i for i, (f, r) in zip(todo, ok) if f and not r]
    if nonfinite:
        ctl._warn_once(
            "nonfinite",
            f"SRLoRA: switch at step {ctl.global_step} skipped for "
            f"{len(nonfinite)} of {len(todo)} module(s) whose LoRA factors or "
            f"importance hold NaN/Inf (e.g. {ctl.layers[nonfinite[0]].name!r}): "
            "fusing them would put non-finite values into the frozen weight. Their "
            "frozen weights are left as they are; the training has diverged (lower "
            "the learning rate, clip gradients, or skip non-finite steps) - later "
            "switches skip such modules too, without a new warning",
        )
    if overflow:
        L = ctl.layers[overflow[0]]
        ctl._warn_once(
            "overflow",
            f"SRLoRA: switch at step {ctl.global_step} skipped for "
            f"{len(overflow)} of {len(todo)} module(s) whose fused weight could exceed "
            f"the range of {L.dtype} (e.g. {L.name!r}, LoRA factors up to "
            f"{float(L.B().abs().max()):.3g} / {float(L.A().abs().max()):.3g}): it "
            "would hold Inf. Their frozen weights are left as they are; lower the "
            "learning rate or clip gradients (or use a float32 / bfloat16 base) - "
            "later switches skip such modules too, without a new warning",
        )
    bad = set(nonfinite) | set(overflow)
    return [i for i in todo if i not in bad] if bad else todo


# ---------------------------------------------------------------------- resume (case 6)
def resume_total_steps(ctl: SRLoRAController, live: Optional[int]) -> None:
    """``total_steps`` changed mid-run: a load into a controller built with another
    ``total_steps`` (``live``, which docs/checkpoints.md allows), or ``set_total_steps`` after
    steps were taken (the Trainer callback on a resume with another ``max_steps``). The new value
    wins; the switches made stay; a planned (fixed) schedule's remaining switches are the new
    schedule's steps after the current one, at most as many as the switch budget has left. One
    warning naming the field (none when no run length was known before)."""
    old = ctl.total_steps
    if live is None or live == old:
        return
    ctl.total_steps = live
    if ctl.schedule is None:
        ctl._switch_steps = None  # rebuilt from the new total_steps on the next read
    if not _switching(ctl):
        return
    msg = (
        f"SRLoRA: total_steps changes from {old} to {live} at optimizer step "
        f"{ctl.global_step} (a resume with another total_steps, or set_total_steps mid-run): "
        "the new total_steps is used"
    )
    new = planned_steps(ctl)
    if new is not None:
        done = [e["step"] for e in ctl.history]
        later = [t for t in new if t > ctl.global_step]
        # directions never run out and switch_interval: the interval runs to the end of the run
        unbounded = getattr(ctl.schedule, "unbounded", ctl.config.exhaustion == "refresh")
        if not (unbounded and ctl.config.switch_interval is not None):
            later = later[: max(0, ctl.config.num_switches - len(done))]
        _override_planned(ctl, set(done) | set(later))
        msg += f"; the remaining switches are at steps {later} (done at {done})"
    if old is not None:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------- wrap (case 8)
def check_reachable_switches(ctl: SRLoRAController) -> None:
    """Warn at wrap when ``r_target`` plans more switches than the layers have directions for
    (exhaustion "stop": a module whose directions are used up switches no more), naming
    ``r_target`` and the number of switches that will change anything."""
    cfg = ctl.config
    if (
        _switching(ctl)
        and cfg.num_switches == 0
        and not (cfg.switch_interval is not None and ctl.steps.exhaustion.grows)
    ):
        warnings.warn(
            f"SRLoRAConfig.r_target={cfg.r_target} plans no switch: (r_target - r) // "
            f"round(gamma * r) = ({cfg.r_target} - {cfg.r}) // {cfg.r_prime} = 0, so "
            f"method={cfg.method!r} trains as a plain adapter that never switches. "
            f"Set r_target >= {cfg.r + cfg.r_prime} for one switch or more",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if not _switching(ctl) or cfg.exhaustion != "stop" or not ctl.modules:
        return
    k = cfg.r_prime
    K = max(st.K for st in ctl.modules)
    real = max(0, (K - cfg.r) // k) if k else 0
    planned = cfg.num_switches
    if real >= planned:
        return
    warnings.warn(
        f"SRLoRAConfig.r_target={cfg.r_target} plans {planned} switches, but the "
        f"adapted layers have at most {K} singular directions (min(out, in) of the "
        f"weight): only the first {real} switch(es) can change anything, the other "
        f"{planned - real} would do nothing. Set r_target={K} to spread the {real} "
        "real switches over the run (or exhaustion='refresh' to keep switching)",
        RuntimeWarning,
        stacklevel=3,
    )
