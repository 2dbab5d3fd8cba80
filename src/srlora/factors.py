"""The SRLoRA math as small pure functions over tensors.

Shape legend: ``m`` out features, ``n`` in features, ``r`` rank (pairs), ``k`` pairs switched,
``s`` PEFT's scaling ``lora_alpha / r``. B is ``m x r``, A is ``r x n``; pair j is ``B[:, j]``
with ``A[j, :]``, and the adapter adds ``s * B @ A`` to the frozen weight W.
"""
from __future__ import annotations

import torch


def pissa_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of k singular directions, scaled as PEFT's PiSSA does.

    Returns ``B = U sqrt(S/s)`` (m x k) and ``A = sqrt(S/s) Vh`` (k x n), so that
    ``s * B @ A == U diag(S) Vh`` (to float rounding).
    """
    root = torch.sqrt(S / scaling)
    return U * root[None, :], root[:, None] * Vh


def pair_scores(score_B: torch.Tensor, score_A: torch.Tensor) -> torch.Tensor:
    """Per-pair importance ``S_j = mean_i score_B[i, j] + mean_l score_A[j, l]`` (length r)."""
    return score_B.mean(dim=0) + score_A.mean(dim=1)


def lowest_pairs(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores, ties broken by lower index, returned in ascending index order.

    A stable sort makes the choice a pure function of the scores: identical on every process.
    """
    order = torch.sort(scores.detach().cpu(), stable=True).indices[:k]
    return torch.sort(order).values


def switch_delta(B_low: torch.Tensor, A_low: torch.Tensor, B_new: torch.Tensor,
                 A_new: torch.Tensor, scaling: float) -> torch.Tensor:
    """Change of the frozen weight at a switch: fuse the old pairs, subtract the new ones.

    ``W + switch_delta + s*B'@A' == W + s*B@A`` where B', A' have the slots replaced: the
    effective weight, and so the model's output, is unchanged.
    """
    return scaling * (B_low @ A_low - B_new @ A_new)


def ema_importance(ibar: torch.Tensor, ubar: torch.Tensor, sensitivity: torch.Tensor,
                   beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of AdaLoRA's smoothed sensitivity and uncertainty (paper Eqs. 3-6).

    ``ibar' = b1*ibar + (1-b1)*I``; ``ubar' = b2*ubar + (1-b2)*|I - ibar'|``, I = |w*g|.
    The element score is ``ibar' * ubar'``.
    """
    ibar_new = torch.lerp(ibar, sensitivity, 1.0 - beta1)
    ubar_new = torch.lerp(ubar, (sensitivity - ibar_new).abs(), 1.0 - beta2)
    return ibar_new, ubar_new


def switch_steps(total_steps: int | None, num_switches: int, interval: int | None) -> list[int]:
    """Optimizer steps (1-based counts) after which a switch happens.

    Default: ``k * (total_steps // (num_switches + 1))`` for k = 1..num_switches, so the last
    switch is not wasted on the final step. With an explicit ``interval``: ``k * interval``, kept
    within total_steps when that is known.
    """
    if num_switches <= 0:
        return []
    if interval is None:
        if total_steps is None:
            raise ValueError("SRLoRAConfig.total_steps (or switch_interval) must be set to "
                             "schedule switches")
        interval = total_steps // (num_switches + 1)
        if interval < 1:
            raise ValueError(f"SRLoRAConfig.total_steps = {total_steps} is too few for "
                             f"{num_switches} switches; raise total_steps, lower r_target, or "
                             "set switch_interval")
    steps = [k * interval for k in range(1, num_switches + 1)]
    if total_steps is not None:
        steps = [t for t in steps if t <= total_steps]
    return steps
