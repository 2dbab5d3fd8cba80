"""Step 2, which pairs a switch fuses (``SRLoRAConfig.selection``): the interface.

A selection turns the pair scores of one switch group (``G x r``, step 1) into ranking keys; the
switch fuses the ``r'`` pairs of lowest key (ties to the lower index).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Strategy


class Selection(Strategy):
    field = "selection"
    reads_factors: ClassVar[bool] = False  # keys() reads the stacked factors B, A
    reads_young: ClassVar[bool] = False  # keys() reads the slots written at the last switch

    def keys(
        self, scores: torch.Tensor, B: torch.Tensor, A: torch.Tensor, young: list[list[int]]
    ) -> torch.Tensor:
        """``G x r`` ranking keys (the lowest are fused). ``B`` ``G x m x r``, ``A``
        ``G x r x n`` (when ``reads_factors``), ``young``: per module the slots written at its
        previous switch (when ``reads_young``)."""
        raise NotImplementedError
