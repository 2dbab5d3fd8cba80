"""The strategy interface: one class per step of the switch, one subclass per variant.

A switch is the paper's steps (docs/algorithm.md): *selection* (which pairs to fuse), *insertion*
(what a recomposed slot starts from), *schedule* (when switches happen), *exhaustion* (what a
module whose directions are used up does) and *optimizer* (what happens to the optimizer state
of a recomposed slot). Each step is chosen by one SRLoRAConfig field; each value of that field is
a registered :class:`Strategy` subclass that declares

* ``needs``: what it needs to run (``"total_steps"``, ``"adam"``: torch Adam/AdamW, ``"probe"``:
  the weight-gradient probe during the step before a switch, ``"optimizer"``: the optimizer
  whose state a switch edits);
* ``refuses``: field values it cannot be combined with, each with the reason;
* ``fsdp2``: whether it runs under FSDP2's sharded switch;
* ``reads``: the config fields only it reads (set while another strategy is chosen, they are
  ignored, and the config warns once naming them).

:mod:`srlora.strategies.checks` turns those declarations into the refusals, in one place. The
core (controller, switch) asks the registry for a field's strategy and never names a variant.
"""

from __future__ import annotations

from typing import ClassVar, Optional

REGISTRY: dict[str, dict[str, type]] = {}  # config field -> value -> Strategy subclass
# the SRLoRAConfig fields a strategy can be registered for, one per step of the switch
STEP_FIELDS = ("selection", "insertion", "switch_schedule", "exhaustion", "optimizer_state")


class Strategy:
    """One variant of one step. ``field``/``name``: the SRLoRAConfig field and value that choose
    it. Instances are built per controller from its config (``self.config``)."""

    field: ClassVar[str] = ""
    name: ClassVar[str] = ""
    needs: ClassVar[frozenset] = frozenset()
    refuses: ClassVar[dict] = {}  # other field -> (values, why)
    fsdp2: ClassVar[bool] = True
    reads: ClassVar[frozenset] = frozenset()

    def __init__(self, config):
        self.config = config


def register(cls: Optional[type] = None, *, replace: bool = False):
    """Class decorator: make ``cls`` the strategy of ``cls.field == cls.name``. A name already
    registered for that field is refused (it would silently change what every config naming it
    runs) unless ``replace=True`` (``@register(replace=True)``)."""
    if cls is None:
        return lambda c: register(c, replace=replace)
    if not cls.field or not cls.name:
        raise ValueError(f"{cls.__name__}: a strategy needs its field and name")
    if cls.field not in STEP_FIELDS:
        raise ValueError(
            f"{cls.__name__}: field {cls.field!r} is not a step of the switch; "
            f"subclass the interface of one of {STEP_FIELDS}"
        )
    have = REGISTRY.get(cls.field, {}).get(cls.name)
    same = have is not None and (have.__module__, have.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if have is not None and not replace and not same:  # same: a module imported again
        raise ValueError(
            f"{cls.__name__}: {cls.field}={cls.name!r} is already registered "
            f"({have.__module__}.{have.__qualname__}); choose another name, or "
            "@register(replace=True) to replace it"
        )
    REGISTRY.setdefault(cls.field, {})[cls.name] = cls
    return cls


def names(field: str) -> tuple:
    """The registered values of ``field``, in registration order (the default first)."""
    return tuple(REGISTRY.get(field, {}))


def get(field: str, name: str) -> type:
    try:
        return REGISTRY[field][name]
    except KeyError:
        raise ValueError(
            f"SRLoRAConfig.{field}: must be one of {names(field)}, got {name!r}"
        ) from None
