"""``exhaustion="refresh"``: the next block is the top of the SVD of the module's current frozen
weight, appended to its cache, and switching continues (:mod:`srlora.refresh`)."""

from __future__ import annotations

from ..refresh import apply_refresh, needs_refresh, plan_refresh
from .base import register
from .exhaustion import Exhaustion


@register
class RefreshExhaustion(Exhaustion):
    name = "refresh"
    grows = True
    needs = frozenset({"total_steps"})  # with switch_interval: switches to the end of the run
    refuses = {
        "insertion": (
            ("lora",),
            "computes SVD directions that insertion='lora' never reads; use exhaustion='extend'",
        )
    }
    fsdp2 = False  # the SVD of the whole frozen weight

    def can_switch(self, st, k):
        return st.p + k <= st.K or needs_refresh(st, k)

    def plan(self, modules, stale, k):
        return plan_refresh(modules, stale, k, self.config)

    def apply(self, modules, plans):
        return apply_refresh(modules, plans)
