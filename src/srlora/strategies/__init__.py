"""The switch's steps as strategies (docs/extending.md): the registry, the declarations' checks,
and every built-in variant (importing a variant's file registers it)."""

from __future__ import annotations

# the paper's choice first in each step (it is the field's default); order = names() order
from . import selection_importance, selection_protect, selection_normalized  # noqa: F401,I001
from . import insertion_svd, insertion_gradient, insertion_lora  # noqa: F401,I001
from . import schedule_fixed, schedule_adaptive  # noqa: F401,I001
from . import exhaustion_stop, exhaustion_refresh, exhaustion_extend  # noqa: F401,I001
from . import optimizer_zero, optimizer_keep, optimizer_rewarm, optimizer_prune  # noqa: F401,I001
from .base import REGISTRY, Strategy, get, names, register
from .checks import (
    STEP_FIELDS,
    check_config,
    check_optimizer,
    chosen,
    fsdp2_refused,
    ignored_fields,
    virtual_refused,
)

__all__ = [
    "REGISTRY",
    "Strategy",
    "get",
    "names",
    "register",
    "STEP_FIELDS",
    "check_config",
    "check_optimizer",
    "chosen",
    "fsdp2_refused",
    "ignored_fields",
    "virtual_refused",
    "Steps",
    "resolve",
]


class Steps:
    """One controller's strategies, one per step, built from its config."""

    def __init__(self, config, n_modules: int):
        self.selection = get("selection", config.selection)(config)
        self.insertion = get("insertion", config.insertion)(config)
        self.exhaustion = get("exhaustion", config.exhaustion)(config)
        self.optimizer = get("optimizer_state", config.optimizer_state)(config)
        self.schedule = get("switch_schedule", config.switch_schedule)(
            config, n_modules, self.exhaustion.grows
        )

    def needs(self, what: str) -> bool:
        """Does any of the strategies declare ``what`` among its needs?"""
        return any(
            what in s.needs
            for s in (
                self.selection,
                self.insertion,
                self.exhaustion,
                self.optimizer,
                self.schedule,
            )
        )


def resolve(config, n_modules: int) -> Steps:
    return Steps(config, n_modules)
