"""What a module whose cached directions are used up does (``SRLoRAConfig.exhaustion``): the
interface. Before a switch, the modules that cannot take ``k`` more directions from their cache
(``stale``) are given a new block (:meth:`plan` reads only, :meth:`apply` writes the cache), or,
for a strategy that does not grow the cache, stop switching."""

from __future__ import annotations

from typing import ClassVar

from .base import Strategy


class Exhaustion(Strategy):
    field = "exhaustion"
    grows: ClassVar[bool] = False  # appends blocks to the cache: never runs out, so a
    # switch_interval schedule runs to the end; saved as "blocks", recorded as "refreshed"

    def can_switch(self, st, k: int) -> bool:
        """Can module state ``st`` take a switch of ``k`` pairs (after a new block if needed)?"""
        return st.p + k <= st.K

    def plan(self, modules: list, stale: list[int], k: int) -> list:
        """The new blocks of the modules ``stale``; reads only."""
        return []

    def apply(self, modules: list, plans: list) -> list[int]:
        """Write the planned blocks; returns the modules that got one."""
        return []
