"""Step 5, the optimizer state of a recomposed slot (``SRLoRAConfig.optimizer_state``): the
interface. ``hit`` is ``G x r`` bool over the layers ``Ls`` of one switch group, true at the
recomposed slots (rows of A, columns of B)."""

from __future__ import annotations

from typing import ClassVar

from .base import Strategy


class OptimizerPolicy(Strategy):
    field = "optimizer_state"
    needs = frozenset({"optimizer"})
    zeroes_slots: ClassVar[bool] = False  # exactly "zero the state of the hit slots" (FSDP2)

    def on_switch(self, optimizer, Ls: list, hit) -> None:
        """Edit the optimizer state of the recomposed slots."""

    def entry(self, optimizer, Ls: list) -> dict:
        """Fields this policy adds to the switch's history entry."""
        return {}

    def after_step(self, optimizer, layers: list, history: list) -> None:
        """Runs after every optimizer step, before the importance update."""

    def reset(self) -> None:
        """A new optimizer was bound, or a state loaded: forget what was cached."""

    @staticmethod
    def check_optimizer(optimizer) -> None:
        """Raise ValueError if this policy cannot work with ``optimizer`` (checked at bind)."""
