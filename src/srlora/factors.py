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


def switch_factors(B_low: torch.Tensor, A_low: torch.Tensor, B_new: torch.Tensor,
                   A_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B_low | -B_new]`` and ``[A_low ; A_new]``: one rank-2k product equal to
    ``B_low @ A_low - B_new @ A_new``, so a switch is one ``addmm_`` into the weight
    (``W.addmm_(Bc, Ac, alpha=s)`` is ``W + switch_delta(...)`` up to fp32 rounding)."""
    return torch.cat([B_low, -B_new], dim=1), torch.cat([A_low, A_new], dim=0)


def _float_bits(dtype: torch.dtype) -> tuple[int, int]:
    """(exponent bias, fraction bits) of a 16-bit float format."""
    fi = torch.finfo(dtype)
    m = -round(math.log2(fi.eps))  # fraction bits: bf16 7, fp16 10
    bias = 1 - round(math.log2(fi.smallest_normal))  # bf16 127, fp16 15
    return bias, m


def spacing(hi: torch.Tensor) -> torch.Tensor:
    """Distance (fp32) from each value of the 16-bit float ``hi`` to the next one away from
    zero: ``2**(E - bias - m)`` for biased exponent ``E`` and ``m`` fraction bits; the subnormal
    spacing ``2**(1 - bias - m)`` for zeros and subnormals. Read off the exponent bits: a few
    integer passes, no float math (``tests/test_precision.py`` checks all 65,536 values)."""
    bias, m = _float_bits(hi.dtype)
    E = ((hi.view(torch.int16).int() >> m) & ((1 << (15 - m)) - 1)).clamp_(min=1)
    field = E.add_(127 - bias - m)  # the spacing's fp32 exponent field
    if 1 - bias - m + 127 >= 1:  # every spacing is a normal fp32 number (fp16)
        return field.bitwise_left_shift_(23).view(torch.float32)
    sub = torch.bitwise_left_shift(torch.ones_like(field), (field + 22).clamp_(min=0))
    return torch.where(field >= 1, field << 23, sub).view(torch.float32)


def split_residual(W: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (fp32) as ``hi`` (rounded to ``dtype``) and an int8 residual ``q``.

    ``join_residual(hi, q)`` equals ``W`` to within ``spacing(hi) / 508``: about 8 more bits
    than ``hi`` alone (round to nearest leaves ``|W - hi| <= spacing(hi) / 2``, so |q| <= 127).
    Overwrites ``W`` (it becomes the scaled residual): ``q = round((W - hi) / spacing * 254)``.
    """
    hi = W.to(dtype)
    q = W.sub_(hi).div_(spacing(hi)).mul_(RESIDUAL_STEPS).round_()
    return hi, q.to(torch.int8)


def join_residual(hi: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The fp32 value ``hi + q * spacing(hi) / 254`` that ``split_residual`` stored (new tensor)."""
    return spacing(hi).div_(RESIDUAL_STEPS).mul_(q).add_(hi)


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
