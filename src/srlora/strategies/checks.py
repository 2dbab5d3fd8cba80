"""Every refusal that follows from the strategies' declarations (:mod:`.base`), in one place.

``check_config``: at construction (and again in ``srlora.wrap``), from the config alone.
``check_optimizer`` / ``fsdp2_refused``: when an optimizer is bound or a sharded engine found.
"""

from __future__ import annotations

from .base import REGISTRY, STEP_FIELDS, Strategy, get


def chosen(config) -> list[type]:
    """The strategy classes ``config`` chooses, one per step."""
    return [get(f, getattr(config, f)) for f in STEP_FIELDS if f in REGISTRY]


def check_config(config) -> None:
    """Raise ValueError naming the strategy's field when it refuses another field's value
    (``refuses``: field -> (values, or None for any value set, and the reason, a phrase that
    follows the strategy's name))."""
    for cls in chosen(config):
        for other, (values, why) in cls.refuses.items():
            value = getattr(config, other)
            hit = value is not None if values is None else value in values
            if hit:
                raise ValueError(
                    f"SRLoRAConfig.{cls.field}: {cls.name!r} {why} (got "
                    f"SRLoRAConfig.{other}={value!r})"
                )


def ignored_fields(config, defaults: dict) -> dict[str, str]:
    """Fields set away from their default (``defaults``) that only strategies not chosen read
    -> ``field='value'`` of the strategies that would read them."""
    read = {f for cls in chosen(config) for f in cls.reads}
    owners: dict[str, list[str]] = {}
    for by_name in REGISTRY.values():
        for cls in by_name.values():
            for f in cls.reads:
                owners.setdefault(f, []).append(f"{cls.field}={cls.name!r}")
    return {
        f: " or ".join(o)
        for f, o in sorted(owners.items())
        if f not in read and getattr(config, f) != defaults[f]
    }


def needing(config, need: str) -> list[type]:
    return [cls for cls in chosen(config) if need in cls.needs]


def check_optimizer(config, optimizer) -> None:
    """Raise ValueError when a chosen strategy needs torch Adam/AdamW and ``optimizer`` is not."""
    for cls in needing(config, "adam"):
        cls.check_optimizer(optimizer)


def virtual_refused(config) -> list[str]:
    """``field='value'`` of every chosen strategy that refuses ``fusion='virtual'``."""
    return [
        f"{cls.field}={cls.name!r}"
        for cls in chosen(config)
        if "virtual" in (cls.refuses.get("fusion", ((), ""))[0] or ())
    ]


def fsdp2_refused(config) -> list[str]:
    """``field='value'`` of every chosen strategy that does not run under FSDP2."""
    return [f"{cls.field}={cls.name!r}" for cls in chosen(config) if not cls.fsdp2]


__all__ = [
    "Strategy",
    "check_config",
    "ignored_fields",
    "check_optimizer",
    "fsdp2_refused",
    "virtual_refused",
    "chosen",
    "STEP_FIELDS",
]
