"""``optimizer_state="rewarm"``: zero the state as "zero" does, then count each restarted slot's
Adam bias correction from its own restart (:mod:`srlora.rewarm`). torch Adam/AdamW only."""

from __future__ import annotations

from ..optimizer_state import zero_slots_
from ..rewarm import Rewarm, adam_step_count, check_optimizer
from .base import register
from .optimizer import OptimizerPolicy


@register
class RewarmState(OptimizerPolicy):
    name = "rewarm"
    needs = frozenset({"optimizer", "adam"})
    fsdp2 = False  # the per-slot correction reads whole moments

    def __init__(self, config):
        super().__init__(config)
        self._rewarm = Rewarm()

    def on_switch(self, optimizer, Ls, hit):
        zero_slots_(optimizer, Ls, hit)

    def entry(self, optimizer, Ls):
        # Adam's step count at the restart: each slot's bias correction counts from it
        return {"optimizer_step": adam_step_count(optimizer, Ls[0].lora_A) or 0}

    def after_step(self, optimizer, layers, history):
        self._rewarm(optimizer, layers, history)

    def reset(self):
        self._rewarm.reset()

    @staticmethod
    def check_optimizer(optimizer):
        check_optimizer(optimizer)
