"""``SRLoRAConfig(optimizer_state="rewarm")``: Adam's bias correction counted from each slot's own
restart.

A switch zeroes the Adam moments of a reinitialized slot (as ``"zero"`` does) but Adam's step
counter ``t`` runs on, so the slot's first update divides ``m = (1-b1) g`` by ``1-b1^t ~ 1`` and
``sqrt(v) = sqrt(1-b2) |g|`` by ``sqrt(1-b2^t)``: ``(1-b1)/sqrt(1-b2^t)`` times the learning
rate, 2.52x at ``t = 1000`` with AdamW's defaults, and it stays above 1x for ~1/(1-b2) steps
(docs/algorithm.md; ``python benchmarks/adam_restart.py``). A fresh parameter would have been
corrected by ``1-b1^tau`` and ``1-b2^tau``, ``tau`` the steps since its restart.

``"rewarm"`` gives each restarted slot exactly that: after every optimizer step it replaces the
slot's Adam update computed with the global ``t`` by the one computed with its own ``tau``, from
the moments Adam has just written (:func:`slot_correction`)::

    actual  = lr * (m / c1 ) / (sqrt(v) / sqrt(c2 ) + eps),   c1  = 1-b1^t,   c2  = 1-b2^t
    desired = lr * (m / c1') / (sqrt(v) / sqrt(c2') + eps),   c1' = 1-b1^tau, c2' = 1-b2^tau
    param  += actual - desired

which is torch's Adam/AdamW formula (weight decay is applied to the parameter before it and is
not touched). A slot never restarted has ``tau = t``: its correction is exactly zero. The slot's
first update is then ``lr * g / (|g| + eps)``, at most the learning rate per element, as for any
fresh parameter. Only torch's Adam and AdamW (without amsgrad) are accepted: another optimizer's
update is not this formula (:func:`check_optimizer`).

The restart step of each slot is Adam's own step count at the switch, stored in the switch's
history entry (``"optimizer_step"``), so it is in every checkpoint and resume stays bitwise.
"""

from __future__ import annotations

from typing import Optional

import torch

from .layers import AdaptedLayer


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose update is not Adam's formula (before anything is bound)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(
            f"SRLoRAConfig.optimizer_state='rewarm' re-derives Adam's bias "
            f"correction per slot; it needs torch.optim.Adam or AdamW, got "
            f"{type(optimizer).__name__} (use optimizer_state='zero' or 'keep')"
        )
    for g in optimizer.param_groups:
        for key in ("amsgrad", "maximize", "capturable", "differentiable"):
            if g.get(key):
                raise ValueError(
                    f"SRLoRAConfig.optimizer_state='rewarm' does not support "
                    f"{type(optimizer).__name__}({key}=True)"
                )


def slot_correction(
    m: torch.Tensor,
    v: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    t: float,
    tau: torch.Tensor,
) -> torch.Tensor:
    """``actual - desired`` of the module docstring, fp32, for moments ``m``, ``v`` (any shape)
    and ``tau`` broadcastable to them. Both terms take the same operations, so where
    ``tau == t`` the result is exactly zero."""
    m, v = m.float(), v.float()

    def update(steps: torch.Tensor) -> torch.Tensor:
        steps = steps.to(device=m.device, dtype=torch.float64)
        c1, c2 = (1.0 - beta1**steps).float(), (1.0 - beta2**steps).float()
        return m / ((v.sqrt() / c2.sqrt() + eps) * c1)

    return (update(torch.tensor(float(t))) - update(tau)).mul_(lr)


def restart_steps(history: list[dict], G: int, r: int) -> torch.Tensor:
    """``G x r`` float64: per module and slot, Adam's step count when the slot was last
    restarted (``-1``: never), read from the switch history."""
    t0 = torch.full((G, r), -1.0, dtype=torch.float64)
    for entry in history:
        if "optimizer_step" not in entry:
            continue
        for i, slots in zip(entry["modules"], entry["slots"]):
            t0[i, slots] = float(entry["optimizer_step"])
    return t0


def adam_step_count(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Optional[int]:
    """Adam's step count of parameter ``p`` (None before its first step)."""
    st = optimizer.state.get(p)
    if not st or "step" not in st:
        return None
    return int(st["step"])


@torch.no_grad()
def rewarm_(
    optimizer: torch.optim.Optimizer,
    layers: list[AdaptedLayer],
    t0: torch.Tensor,
    groups: dict,
    done: dict,
) -> None:
    """Apply each restarted slot's correction to its row of A and column of B, once per Adam
    step (``done``: parameter id -> the step already corrected; a step Adam skipped, e.g. by a
    GradScaler, is not corrected twice). ``groups``: parameter id -> its param group."""
    for i, L in enumerate(layers):
        if not bool((t0[i] >= 0).any()):
            continue
        for p, dim in ((L.lora_A, 0), (L.lora_B, 1)):
            t = adam_step_count(optimizer, p)
            if t is None or done.get(id(p)) == t:
                continue
            done[id(p)] = t
            tau = torch.where(t0[i] >= 0, float(t) - t0[i], float(t)).clamp_min(1.0)
            shape = [1] * p.dim()  # A: r x n (x 1 x 1 for a 1x1 conv); B: m x r (x 1 x 1)
            shape[dim] = -1
            g, st = groups[id(p)], optimizer.state[p]
            b1, b2 = g["betas"]
            fix = slot_correction(
                st["exp_avg"],
                st["exp_avg_sq"],
                float(g["lr"]),
                float(b1),
                float(b2),
                float(g["eps"]),
                float(t),
                tau.view(shape),
            )
            p.add_(fix.to(p.dtype))


class Rewarm:
    """The controller's "rewarm" work per step: the restart steps read from the switch history
    (rebuilt when it grows), the bound optimizer's param groups, the steps already corrected."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget the cache (a new optimizer bound, or a state loaded)."""
        self.key, self.t0, self.groups, self.done = None, None, {}, {}

    def __call__(
        self, optimizer: torch.optim.Optimizer, layers: list[AdaptedLayer], history: list[dict]
    ) -> None:
        key = (id(optimizer), len(history))
        if key != self.key:
            self.key = key
            self.groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            self.t0 = restart_steps(history, len(layers), layers[0].r if layers else 0)
        if bool((self.t0 >= 0).any()):
            rewarm_(optimizer, layers, self.t0, self.groups, self.done)
