"""``selection="protect"``: as the paper, but a slot written at the module's previous switch is
fused only when too few older slots are left (a new direction gets one whole interval)."""

from __future__ import annotations

import torch

from .base import register
from .selection import Selection


def protected_keys(scores: torch.Tensor, young: list[list[int]]) -> torch.Tensor:
    """``scores`` with the slots in ``young`` ranked after every other slot of their module, in
    their own score order: ``+ (max - min + 1)`` keeps the order inside each class."""
    if not any(young):
        return scores
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for g, slots in enumerate(young):
        mask[g, slots] = True
    mask = mask.to(scores.device)
    span = (scores.amax(-1, keepdim=True) - scores.amin(-1, keepdim=True)).add_(1.0)
    return scores + mask * span


@register
class ProtectSelection(Selection):
    name = "protect"
    reads_young = True

    def keys(self, scores, B, A, young):
        return protected_keys(scores, young)
