"""``exhaustion="stop"`` (the paper): a module whose ``r_target`` directions are used up
switches no more."""

from __future__ import annotations

from .base import register
from .exhaustion import Exhaustion


@register
class StopExhaustion(Exhaustion):
    name = "stop"
