"""``insertion="gradient"``: the new slots take the top singular directions of the part of the
last step's full weight gradient that the kept slots cannot follow, at the scale the paper's
direction would have had (the math and the probe: :mod:`srlora.insertion`)."""

from __future__ import annotations

from ..insertion import group_directions
from .base import register
from .insertion import Inserted, Insertion, paper_pairs


@register
class GradientInsertion(Insertion):
    name = "gradient"
    needs = frozenset({"probe"})
    refuses = {
        "switch_schedule": (
            ("adaptive",),
            "needs the fixed schedule (it records the "
            "weight gradient during the step before a switch, known "
            "only ahead of a fixed schedule); use "
            "switch_schedule='fixed'",
        )
    }
    fsdp2 = False  # the probe reads whole weight gradients

    def insert(self, U, S, Vh, scaling, B, A, slots, grads, seeds):
        U, Vh, used = group_directions(grads, B, A, slots, U, Vh)
        return Inserted(U, S, Vh, *paper_pairs(U, S, Vh, scaling), written=True, used=used)
