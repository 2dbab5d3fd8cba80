"""``optimizer_state="prune"`` (ReLoRA, Lialin et al. 2023, arXiv 2307.05695, Sec. 3): at a
restart the optimizer state of the restarted parameters is magnitude-pruned: in each state tensor
(Adam's moments, ...) of the recomposed slots every entry at or below the ``PRUNE_RATIO``
quantile of their magnitudes is zeroed, the largest ``1 - PRUNE_RATIO`` kept (ReLoRA's
``optimizer_magnitude_pruning``; its paper prunes 99%). One addition: Adam's first moment is
also zeroed where its second moment was pruned (:func:`prune_adam_`), else a restarted A, whose
gradient is zero while its B is, steps by ``m / eps``."""

from __future__ import annotations

import torch

from .base import register
from .optimizer import OptimizerPolicy

PRUNE_RATIO = 0.99


def magnitude_prune_(v: torch.Tensor, mask: torch.Tensor, ratio: float) -> None:
    """Zero the entries of ``v`` under ``mask`` whose magnitude is at most the ``ratio`` quantile
    of ``|v[mask]|`` (ReLoRA's ``_magnitude_pruning_`` restricted to ``mask``)."""
    sel = v[mask]
    if sel.numel() == 0:
        return
    mag = sel.abs().float()
    if mag.numel() <= 1 << 24:
        threshold = torch.quantile(mag, ratio)
    else:  # torch.quantile's input limit: the same order statistic without interpolation
        threshold = mag.kthvalue(max(1, int(ratio * mag.numel()))).values
    v[mask & (v.abs() <= threshold.to(v.dtype))] = 0


def prune_adam_(state: dict, mask: torch.Tensor, ratio: float) -> None:
    """Magnitude-prune every parameter-shaped tensor of one parameter's optimizer ``state`` under
    ``mask`` (each on its own, as ReLoRA does); then zero Adam's first moment wherever its second
    moment was pruned: ``m / (sqrt(0) + eps)`` would step by ``m / eps`` (a restarted A has no
    gradient while its B is zero, so nothing refills that ``v``)."""
    shaped = [v for v in state.values() if torch.is_tensor(v) and v.shape == mask.shape]
    for v in shaped:
        magnitude_prune_(v, mask, ratio)
    m, v = state.get("exp_avg"), state.get("exp_avg_sq")
    if torch.is_tensor(m) and torch.is_tensor(v) and m.shape == v.shape == mask.shape:
        m[mask & (v == 0)] = 0


@register
class PruneState(OptimizerPolicy):
    name = "prune"
    fsdp2 = False

    @torch.no_grad()
    def on_switch(self, optimizer, Ls, hit):
        for g, L in enumerate(Ls):
            for p, dim in ((L.lora_A, 0), (L.lora_B, 1)):
                state = optimizer.state.get(p)
                if not state:
                    continue
                shape = [1] * p.dim()  # A: r x n (x 1 x 1); B: m x r (x 1 x 1)
                shape[dim] = -1
                mask = hit[g].to(p.device).view(shape).expand(p.shape)
                prune_adam_(state, mask, PRUNE_RATIO)
