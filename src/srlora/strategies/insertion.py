"""Step 4, what a recomposed slot starts from (``SRLoRAConfig.insertion``): the interface.

For one switch group, :meth:`Insertion.insert` receives the next unused directions of the SVD
cache (``U`` ``G x m x k``, ``S`` ``G x k``, ``Vh`` ``G x k x n``), the group's factors and the
slots chosen, and returns the new pairs ``B_new`` ``G x m x k``, ``A_new`` ``G x k x n`` and the
directions the cache must hold for them. The identity every insertion keeps (so the switch keeps
the output and the export stays exact): ``s * B_new @ A_new == U diag(S) Vh`` of the returned
directions, the product the switch subtracts from the frozen weight.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Optional

import torch

from ..factors import pissa_factors
from .base import Strategy


class Inserted(NamedTuple):
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    B_new: torch.Tensor  # fp32
    A_new: torch.Tensor  # fp32
    written: bool  # U/S/Vh differ from the cache: the switch writes them into it at p
    used: Optional[list] = None  # per module: did it use a gradient (recorded in the history)


class Insertion(Strategy):
    field = "insertion"
    reads_directions: ClassVar[bool] = True  # reads the SVD cache (else none is computed, and
    # the slots start as PEFT's LoRA init: B zero, A random, nothing subtracted from W)

    def insert(
        self, U, S, Vh, scaling: float, B, A, slots, grads: Optional[list], seeds: list[int]
    ) -> Inserted:
        """The new pairs of one group. ``grads``: per module its weight gradient of the last
        step or None (only for a strategy that needs ``"probe"``); ``seeds``: per module an
        integer that is the same in every process and on resume (for random starts)."""
        raise NotImplementedError


def paper_pairs(U, S, Vh, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's new pairs: the PiSSA factors of the directions (``s*B@A == U diag(S) Vh``)."""
    return pissa_factors(U, S, Vh, scaling)
