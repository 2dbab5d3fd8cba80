"""``switch_schedule="adaptive"``: the fixed schedule's budget of switches, each fired once the
pairs' ranking has settled or the training loss has plateaued (:mod:`srlora.schedule`)."""

from __future__ import annotations

from ..schedule import AdaptiveSchedule as Detector
from ..schedule import check_adaptive
from .base import register
from .schedule import Schedule


@register
class AdaptiveSchedule(Schedule):
    name = "adaptive"
    stateful = True
    reads_loss = True
    reads = frozenset({"adaptive_window", "adaptive_settled", "adaptive_plateau"})
    needs = frozenset({"total_steps"})
    refuses = {
        "switch_span": (
            None,
            "times its own switches; switch_span shapes the fixed "
            "schedule (use switch_schedule='fixed')",
        )
    }
    fsdp2 = False  # reads the whole importance ranking every step

    def __init__(self, config, n_modules, unbounded):
        super().__init__(config, n_modules, unbounded)
        self.detector = Detector(config, n_modules, unbounded)

    def planned(self, total_steps):
        check_adaptive(self.config, total_steps, self.unbounded)  # raises if it cannot run
        return None

    def decide(self, step, total_steps, updated, would_fuse, switchable):
        return self.detector.decide(step, total_steps, updated, would_fuse, switchable)

    def switched(self, step, any_module):
        self.detector.switched(step, any_module)

    def observe_loss(self, value):
        self.detector.observe_loss(value)

    def state_dict(self):
        return self.detector.state_dict()

    def check_state(self, sd):
        return self.detector.check_state(sd)

    def load_state_dict(self, sd):
        self.detector.load_state_dict(sd)
