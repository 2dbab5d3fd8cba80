"""``selection="importance"`` (the paper): the r' pairs of lowest importance score are fused."""

from __future__ import annotations

from .base import register
from .selection import Selection


@register
class ImportanceSelection(Selection):
    name = "importance"

    def keys(self, scores, B, A, young):
        return scores
