"""Step 0, when switches happen (``SRLoRAConfig.switch_schedule``): the interface.

The controller asks after every optimizer step (importance updated, step counted) whether to
switch now, and tells the schedule when a switch happened. A schedule whose steps are known
ahead (``planned``) lets the gradient probe record the step before a switch.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

from .base import Strategy


class Schedule(Strategy):
    field = "switch_schedule"
    stateful: ClassVar[bool] = False  # has state to save in checkpoints
    reads_loss: ClassVar[bool] = False  # observes the training loss (a collective per step)

    def __init__(self, config, n_modules: int, unbounded: bool):
        """``unbounded``: the exhaustion strategy never runs out of directions (a
        ``switch_interval`` schedule then runs to the end of training)."""
        super().__init__(config)
        self.n_modules, self.unbounded = n_modules, unbounded

    def planned(self, total_steps: Optional[int]) -> Optional[list[int]]:
        """The switch steps, when known ahead (raises ValueError when they cannot be built);
        None when they are decided as training goes."""
        raise NotImplementedError

    def decide(
        self,
        step: int,
        total_steps: Optional[int],
        updated: bool,
        would_fuse: Callable,
        switchable: Callable,
    ) -> Optional[str]:
        """After optimizer step ``step``: the reason to switch now, or None. ``updated``: the
        importance was updated this step; ``would_fuse()``: ``M x k`` the pairs each module's
        switch would fuse now; ``switchable()``: per module, can it still switch."""
        raise NotImplementedError

    def is_next(self, step: int, total_steps: Optional[int]) -> bool:
        """Is a switch planned after step ``step + 1``? (False when not known ahead.)"""
        return False

    def switched(self, step: int, any_module: bool) -> None:
        """A switch happened at ``step``."""

    def observe_loss(self, value: float) -> None:
        """A (rank-averaged) training loss, for schedules that read it."""

    def state_dict(self) -> dict:
        return {}

    def check_state(self, sd) -> Optional[str]:
        return None

    def load_state_dict(self, sd: dict) -> None:
        """Load a checked state (and forget what was cached)."""
