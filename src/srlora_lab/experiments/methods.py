"""Method names as users write them in ``srlora compare --methods`` and in study specs.

A method is a base method (``lora``, ``pissa``, ``srlora``), one of PEFT's LoRA variants that the
harness runs as ``lora`` with PEFT flags (``dora``, ``olora``), or a base followed by
``:``-separated SRLoRAConfig settings::

    srlora:rewarm              optimizer_state="rewarm" (a bare value names its one choice field)
    srlora:protect:rewarm      selection="protect", optimizer_state="rewarm"
    srlora:gamma=0.25          any field: FIELD=VALUE (VALUE read as YAML: 0.25, true, keep)
    srlora:paper               SRLoRAConfig.paper()'s pinned fields

The whole text is the method's name in tables, plots and run folders. Every setting is checked
by building the SRLoRAConfig, so a bad one is refused before anything runs.
"""

from __future__ import annotations

from typing import Any

from srlora.config import METHODS as BASE_METHODS  # the library's list of methods

# methods with no adapter, run by the lab only: ``full`` trains every weight (the yardstick)
FULL = "full"
LAB_METHODS = (FULL,)
SHORTHANDS = {
    "dora": ("lora", {"use_dora": True}),
    "olora": ("lora", {"init_lora_weights": "olora"}),
}
HARNESS_FIELDS = ("method", "total_steps", "target_modules", "modules_to_save")


class MethodError(ValueError):
    """A method text that cannot be run; the message names the part at fault."""


def all_methods() -> tuple[str, ...]:
    """Every method name a compare or study accepts as a base."""
    return BASE_METHODS + tuple(SHORTHANDS) + LAB_METHODS


def choice_fields() -> dict[str, list[str]]:
    """Each value of SRLoRAConfig's choice fields (``srlora.config.choices()``) -> the fields it
    belongs to."""
    from srlora.config import choices

    out: dict[str, list[str]] = {}
    for name, allowed in choices().items():
        if name in HARNESS_FIELDS:
            continue
        for value in allowed:
            out.setdefault(value, []).append(name)
    return out


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_method(text: str) -> tuple[str, str, dict]:
    """``text`` -> (name, base method, SRLoRAConfig fields); raises MethodError."""
    import srlora
    from srlora.config import PAPER

    name = text.strip()
    base, *parts = [p.strip() for p in name.split(":")]
    if base in LAB_METHODS:
        if parts:
            raise MethodError(f"{name!r}: {base!r} takes no settings (it has no adapter)")
        return name, base, {}
    if base not in BASE_METHODS + tuple(SHORTHANDS):
        raise MethodError(
            f"unknown method {base!r} in {name!r}; choose from {', '.join(all_methods())}"
        )
    config: dict = {}
    if base in SHORTHANDS:
        base, flags = SHORTHANDS[base]
        config["extra_lora_kwargs"] = dict(flags)
    fields, values = set(srlora.SRLoRAConfig.__dataclass_fields__), choice_fields()
    for part in parts:
        if not part:
            raise MethodError(f"{name!r}: an empty setting between ':'")
        if part == "paper":
            new = {k: v for k, v in PAPER.items() if k != "method"}
        elif "=" in part:
            key, _, raw = part.partition("=")
            key = key.strip()
            if key not in fields or key in HARNESS_FIELDS + ("extra_lora_kwargs",):
                raise MethodError(
                    f"{name!r}: {key!r} is not a setting a method can take "
                    "(SRLoRAConfig fields such as gamma, r_target, selection)"
                )
            new = {key: _value(raw.strip())}
        else:
            owners = values.get(part, [])
            if len(owners) != 1:
                known = ", ".join(sorted(v for v, f in values.items() if len(f) == 1))
                raise MethodError(
                    f"{name!r}: {part!r} "
                    + (
                        f"is a value of several fields {owners}: write FIELD={part}"
                        if owners
                        else f"is not a known setting (values: {known}; or FIELD=VALUE)"
                    )
                )
            new = {owners[0]: part}
        clash = [k for k in new if k in config and config[k] != new[k]]
        if clash:
            raise MethodError(f"{name!r}: {clash[0]!r} is set twice")
        config.update(new)
    try:
        srlora.SRLoRAConfig(method=base, **config)
    except (ValueError, TypeError) as e:
        raise MethodError(f"{name!r}: {e}") from None
    return name, base, config
