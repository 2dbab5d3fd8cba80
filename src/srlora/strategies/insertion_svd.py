"""``insertion="svd"`` (the paper): a recomposed slot takes the next unused singular direction
of the pretrained weight, as a PiSSA pair."""

from __future__ import annotations

from .base import register
from .insertion import Inserted, Insertion, paper_pairs


@register
class SVDInsertion(Insertion):
    name = "svd"

    def insert(self, U, S, Vh, scaling, B, A, slots, grads, seeds):
        return Inserted(U, S, Vh, *paper_pairs(U, S, Vh, scaling), written=False)
