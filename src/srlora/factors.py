"""The SRLoRA math as small pure functions over tensors.

Shape legend: ``m`` out features, ``n`` in features, ``r`` rank (pairs), ``k`` pairs switched,
``s`` PEFT's scaling ``lora_alpha / r``. B is ``m x r``, A is ``r x n``; pair j is ``B[:, j]``
with ``A[j, :]``, and the adapter adds ``s * B @ A`` to the frozen weight W.
"""
from __future__ import annotations

import math

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
    order = torch.sort(scores.detach(), stable=True).indices[:k]
    return torch.sort(order).values  # on the scores' device: no host sync


def switch_delta(B_low: torch.Tensor, A_low: torch.Tensor, B_new: torch.Tensor,
                 A_new: torch.Tensor, scaling: float) -> torch.Tensor:
    """Change of the frozen weight at a switch: fuse the old pairs, subtract the new ones.

    ``W + switch_delta + s*B'@A' == W + s*B@A`` where B', A' have the slots replaced: the
    effective weight, and so the model's output, is unchanged.
    """
    return scaling * (B_low @ A_low - B_new @ A_new)


RESIDUAL_STEPS = 254  # int8 residual: units of spacing(hi) / 254, so |q| <= 127


def spacing(hi: torch.Tensor) -> torch.Tensor:
    """Distance (fp32) from each value of the half-precision ``hi`` to the next one up in
    magnitude within its binade: ``2**(e - p)`` for ``|hi| = f * 2**e``, ``f`` in [0.5, 1),
    ``p`` the format's significand bits; the subnormal spacing for zeros and subnormals."""
    fi = torch.finfo(hi.dtype)
    p = 1 - round(math.log2(fi.eps))  # significand bits: bf16 8, fp16 11
    tiny = fi.smallest_normal * 2.0 ** -(p - 1)
    _, e = torch.frexp(hi.float())
    ulp = torch.ldexp(torch.ones(hi.shape, device=hi.device), e - p)
    return torch.where(hi == 0, tiny, ulp.clamp_min(tiny))


def split_residual(W: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (fp32) as ``hi`` (rounded to ``dtype``) and an int8 residual ``q``.

    ``join_residual(hi, q)`` equals ``W`` to within ``spacing(hi) / 508``: about 8 more bits
    than ``hi`` alone (round to nearest leaves ``|W - hi| <= spacing(hi) / 2``, so |q| <= 127).
    """
    hi = W.to(dtype)
    q = torch.round((W - hi.float()) / spacing(hi) * RESIDUAL_STEPS).clamp_(-127, 127)  # no-op clamp
    return hi, q.to(torch.int8)


def join_residual(hi: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The fp32 value that ``split_residual`` stored as ``hi`` and ``q``."""
    return hi.float() + q.float() * (spacing(hi) / RESIDUAL_STEPS)


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
