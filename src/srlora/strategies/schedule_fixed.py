"""``switch_schedule="fixed"`` (the paper): switches at ``k * floor(total_steps / (N + 1))``,
k = 1..N, or ``k * switch_interval``, or within ``switch_span`` of the run
(:func:`srlora.schedule.fixed_steps`)."""

from __future__ import annotations

from ..schedule import fixed_steps
from .base import register
from .schedule import Schedule


@register
class FixedSchedule(Schedule):
    name = "fixed"

    def __init__(self, config, n_modules, unbounded):
        super().__init__(config, n_modules, unbounded)
        self._cache: tuple = (object(), frozenset())  # (total_steps, its steps)

    def _steps(self, total_steps) -> frozenset:
        if self._cache[0] != total_steps:
            self._cache = (
                total_steps,
                frozenset(fixed_steps(self.config, total_steps, self.unbounded)),
            )
        return self._cache[1]

    def planned(self, total_steps):
        return sorted(self._steps(total_steps))

    def is_next(self, step, total_steps):
        try:
            return step + 1 in self._steps(total_steps)
        except ValueError:  # not buildable yet (e.g. total_steps unknown)
            return False

    def decide(self, step, total_steps, updated, would_fuse, switchable):
        return "fixed" if step in self._steps(total_steps) else None

    def load_state_dict(self, sd):
        self._cache = (object(), frozenset())
