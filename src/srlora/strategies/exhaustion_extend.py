"""``exhaustion="extend"`` (ReLoRA's unbounded restarts): a module out of slots gets a block of
``max(K0 - r, k)`` more, with no directions (zeros: nothing to subtract), and switching
continues. Only for an insertion that does not read the SVD cache (``insertion="lora"``)."""

from __future__ import annotations

import torch

from ..refresh import StackRefresh, apply_refresh, stacks_at_one_pointer
from .base import register
from .exhaustion import Exhaustion


def extend_size(st, k: int) -> int:
    """Slots one block adds: the first block's ``K0 - r`` (at least ``k``)."""
    return max(st.K0 - min(st.layer.r, st.K0), k)


@register
class ExtendExhaustion(Exhaustion):
    name = "extend"
    grows = True
    needs = frozenset({"total_steps"})  # with switch_interval: switches to the end of the run
    refuses = {
        "insertion": (
            ("svd", "gradient"),
            "adds slots without singular directions, "
            "which that insertion reads; use exhaustion='refresh' or 'stop'",
        )
    }
    fsdp2 = False

    def can_switch(self, st, k):
        return True

    def plan(self, modules, stale, k):
        plans = []
        for stack in stacks_at_one_pointer(modules, stale):
            st, (m, n), G = stack.members[0], stack.shape, len(stack.members)
            b, dev = extend_size(st, k), stack.U.device
            plans.append(
                StackRefresh(
                    stack,
                    st.p,
                    torch.zeros(G, m, b, device=dev),
                    torch.zeros(G, b, device=dev),
                    torch.zeros(G, b, n, device=dev),
                )
            )
        return plans

    def apply(self, modules, plans):
        return apply_refresh(modules, plans)
