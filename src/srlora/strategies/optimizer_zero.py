"""``optimizer_state="zero"`` (the paper's default, as ReLoRA resets): zero every parameter-shaped
state tensor (Adam's moments, SGD's momentum, ...) of the recomposed rows of A and columns of B."""

from __future__ import annotations

from ..optimizer_state import zero_slots_
from .base import register
from .optimizer import OptimizerPolicy


@register
class ZeroState(OptimizerPolicy):
    name = "zero"
    zeroes_slots = True

    def on_switch(self, optimizer, Ls, hit):
        zero_slots_(optimizer, Ls, hit)
