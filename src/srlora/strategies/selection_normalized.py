"""``selection="normalized"``: the lowest scores divided by the pair's squared scale
``(|B_j| |A_j|)^2`` (a pair's score grows with the square of its singular value, so a new,
smaller direction is not fused for being small)."""

from __future__ import annotations

import torch

from .base import register
from .selection import Selection


def normalized_keys(scores: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``scores / (|B_j| |A_j|)^2`` per pair j (``G x r``; the scale floored at fp32's tiny)."""
    scale = B.float().pow(2).sum(-2) * A.float().pow(2).sum(-1)
    return scores / scale.clamp_min(torch.finfo(torch.float32).tiny)


@register
class NormalizedSelection(Selection):
    name = "normalized"
    reads_factors = True

    def keys(self, scores, B, A, young):
        return normalized_keys(scores, B, A)
