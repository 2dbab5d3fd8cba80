"""The SRLoRA math as small pure functions over tensors.

Shape legend: ``m`` out features, ``n`` in features, ``r`` rank (pairs), ``k`` pairs switched,
``s`` PEFT's scaling ``lora_alpha / r``. B is ``m x r``, A is ``r x n``; pair j is ``B[:, j]``
with ``A[j, :]``, and the adapter adds ``s * B @ A`` to the frozen weight W.
"""

from __future__ import annotations

import math
import sys

import torch


def pissa_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of k singular directions, scaled as PEFT's PiSSA does.

    Returns ``B = U sqrt(S/s)`` (m x k) and ``A = sqrt(S/s) Vh`` (k x n), so that
    ``s * B @ A == U diag(S) Vh`` (to float rounding). Leading batch dimensions pass through.
    """
    root = torch.sqrt(S / scaling)
    return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh


def pair_scores(score_B: torch.Tensor, score_A: torch.Tensor) -> torch.Tensor:
    """Per-pair importance ``S_j = mean_i score_B[i, j] + mean_l score_A[j, l]`` (length r;
    leading batch dimensions pass through)."""
    return score_B.mean(dim=-2) + score_A.mean(dim=-1)


def lowest_pairs(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores, ties broken by lower index, returned in ascending index order
    (along the last dimension; leading batch dimensions pass through).

    A stable sort makes the choice a pure function of the scores: identical on every process.
    """
    order = torch.sort(scores.detach(), stable=True).indices[..., :k]
    return torch.sort(order).values  # on the scores' device: no host sync


def switch_delta(
    B_low: torch.Tensor,
    A_low: torch.Tensor,
    B_new: torch.Tensor,
    A_new: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Change of the frozen weight at a switch: fuse the old pairs, subtract the new ones.

    ``W + switch_delta + s*B'@A' == W + s*B@A`` where B', A' have the slots replaced: the
    effective weight, and so the model's output, is unchanged.
    """
    return scaling * (B_low @ A_low - B_new @ A_new)


RESIDUAL_STEPS = 254  # fp16's int8 residual: units of spacing(hi) / 254, so |q| <= 127


def switch_factors(
    B_low: torch.Tensor, A_low: torch.Tensor, B_new: torch.Tensor, A_new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B_low | -B_new]`` and ``[A_low ; A_new]``: one rank-2k product equal to
    ``B_low @ A_low - B_new @ A_new``, so a switch is one ``addmm_`` into the weight
    (``W.addmm_(Bc, Ac, alpha=s)`` is ``W + switch_delta(...)`` up to fp32 rounding). Leading
    batch dimensions pass through."""
    return torch.cat([B_low, -B_new], dim=-1), torch.cat([A_low, A_new], dim=-2)


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
    """``W`` (fp32) as ``hi`` (rounded to ``dtype``) and an int8 residual ``q``, new tensors.

    ``join_residual(hi, q)`` equals ``W`` to within ``spacing(hi) / 508`` (bf16: ``/ 512``): about
    8 more bits than ``hi`` alone. Overwrites ``W``. See :func:`split_residual_`.
    """
    hi = torch.empty(W.shape, dtype=dtype, device=W.device)
    q = torch.empty(W.shape, dtype=torch.int8, device=W.device)
    split_residual_(W, hi, q)
    return hi, q


def split_residual_(W: torch.Tensor, hi: torch.Tensor, q: torch.Tensor) -> None:
    """Write ``W`` (fp32; overwritten) into the 16-bit ``hi`` and int8 ``q`` (same shape) in place.

    bf16 (:func:`_split_bf16_`): integer passes on W's bits. fp16: ``hi`` = W rounded to nearest
    (even), ``q = round((W - hi) / spacing(hi) * 254)``; round to nearest leaves
    ``|W - hi| <= spacing(hi) / 2``, so |q| <= 127.
    """
    if hi.dtype == torch.bfloat16:
        _split_bf16_(W, hi, q)
        return
    h = W.to(hi.dtype)
    hi.copy_(h)
    q.copy_(W.sub_(h).div_(spacing(h)).mul_(RESIDUAL_STEPS).round_())


def join_residual(hi: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The fp32 value that :func:`split_residual_` stored (new tensor): for bf16
    :func:`_join_bf16`, for fp16 ``hi + q * spacing(hi) / 254``."""
    if hi.dtype == torch.bfloat16:
        return _join_bf16(hi, q)
    return spacing(hi).div_(RESIDUAL_STEPS).mul_(q).add_(hi)


_LITTLE_ENDIAN = sys.byteorder == "little"


def _split_bf16_(
    W: torch.Tensor, hi: torch.Tensor, q: torch.Tensor, byte_views: bool = _LITTLE_ENDIAN
) -> None:
    """bf16 is the upper half of fp32's bits, so the split is integer work on ``b``, W's bits:
    ``hi = (b + 0x8000) >> 16`` (W rounded to nearest, ties away from zero) and ``q`` = bits
    8..15 of ``b`` (as int8). Then ``b == (hi << 16) + 256*q + l`` with ``0 <= l < 256``
    whichever way hi rounded (rounding up adds 0x10000 to hi's part and flips bit 15, which
    ``q``'s sign absorbs), so :func:`_join_bf16`, which takes ``l = 128``, is within 128 fp32
    ulps of W: ``spacing(hi) / 512``. Three passes over W; with ``byte_views`` (little-endian
    memory, W's last dimension contiguous) ``q`` and ``hi`` are copied from byte and half-word
    views of ``b``, no temporaries.
    """
    b = W.view(torch.int32)
    if byte_views and W.dim() > 0 and W.stride(-1) == 1:
        q.copy_(W.view(torch.int8)[..., 1::4])
        hi.view(torch.int16).copy_(b.add_(0x8000).view(torch.int16)[..., 1::2])
    else:
        q.copy_(b >> 8)  # int32 -> int8 keeps the low byte
        hi.view(torch.int16).copy_(b.add_(0x8000).bitwise_right_shift_(16))


def _join_bf16(hi: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(hi << 16) + 256*q + 128`` read as fp32: the value :func:`_split_bf16_` stored."""
    x = hi.view(torch.int16).to(torch.int32).bitwise_left_shift_(16)
    return x.add_(q, alpha=256).add_(128).view(torch.float32)


def switch_steps(
    total_steps: int | None, num_switches: int, interval: int | None, span: float | None = None
) -> list[int]:
    """Optimizer steps (1-based counts) after which a switch happens.

    Default: ``k * (total_steps // (num_switches + 1))`` for k = 1..num_switches, so the last
    switch is not wasted on the final step. With an explicit ``interval``: ``k * interval``, kept
    within total_steps when that is known. With ``span`` (0 < span <= 1): ``k * floor(span *
    total_steps / num_switches)``, so every switch lands at or before ``span * total_steps``.
    """
    if num_switches <= 0:
        return []
    if span is not None:
        if total_steps is None:
            raise ValueError(
                "SRLoRAConfig.switch_span needs total_steps (the span is a fraction of the run)"
            )
        # + 1e-9: a product that is an integer on paper (0.7 * 300 / 6 = 35) may round below it
        interval = math.floor(span * total_steps / num_switches + 1e-9)
        if interval < 1:
            raise ValueError(
                f"SRLoRAConfig.switch_span = {span} of total_steps = {total_steps} "
                f"is too short for {num_switches} switches; raise switch_span or "
                "total_steps, or lower r_target"
            )
    if interval is None:
        if total_steps is None:
            raise ValueError(
                "SRLoRAConfig.total_steps (or switch_interval) must be set to schedule switches"
            )
        interval = total_steps // (num_switches + 1)
        if interval < 1:
            raise ValueError(
                f"SRLoRAConfig.total_steps = {total_steps} is too few for "
                f"{num_switches} switches; raise total_steps, lower r_target, or "
                "set switch_interval"
            )
    steps = [k * interval for k in range(1, num_switches + 1)]
    if total_steps is not None:
        steps = [t for t in steps if t <= total_steps]
    return steps
