"""``optimizer_state="keep"`` (as GaLore): the optimizer state of recomposed slots is left as it
is; no optimizer needs to be known."""

from __future__ import annotations

from .base import register
from .optimizer import OptimizerPolicy


@register
class KeepState(OptimizerPolicy):
    name = "keep"
    needs = frozenset()
