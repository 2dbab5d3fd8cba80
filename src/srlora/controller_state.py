"""The controller's state as a plain dict, and the one check of a saved state against a live
controller (used by ``controller.load_state_dict`` and by ``load_checkpoint`` before anything is
written), with the one check of a saved config (:func:`check_config`)."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields

import torch

from ._errors import CheckpointMismatchError
from .config import SRLoRAConfig

CONFIG_MAY_DIFFER = ("total_steps", "offload_device")  # may change between save and resume


def saved_config(saved: dict) -> dict:
    """A saved config with every field it predates set to that field's default: a state saved
    before a field existed ran with the default's behaviour (e.g. ``fusion="weight"``)."""
    out = {
        f.name: f.default if f.default is not MISSING else f.default_factory()
        for f in fields(SRLoRAConfig)
    }
    return out | saved


def check_config(saved: dict, config: SRLoRAConfig) -> None:
    """Raise CheckpointMismatchError naming every field (but ``CONFIG_MAY_DIFFER``) whose saved
    value differs from ``config``'s; both sides compared as JSON reads them back."""
    mine = json.loads(json.dumps(config.to_dict()))
    theirs = json.loads(json.dumps(saved_config(saved)))
    diff = {
        k: (theirs.get(k), v)
        for k, v in mine.items()
        if k not in CONFIG_MAY_DIFFER and theirs.get(k) != v
    }
    if diff:
        raise CheckpointMismatchError(f"SRLoRA config differs, field: (saved, current): {diff}")


def grows(ctl) -> bool:
    """Does the controller's exhaustion strategy grow the cache (saved as "blocks")?"""
    return ctl.steps is not None and ctl.steps.exhaustion.grows


def state_dict(ctl) -> dict:
    """All controller state: tensors, ints, strings, lists and dicts only."""
    sd: dict = {
        "config": ctl.config.to_dict(),
        "global_step": ctl.global_step,
        "num_switches": ctl.num_switches,
        "total_steps": ctl.total_steps,
        "history": ctl.history,
        "modules": {},
    }
    for st in ctl.modules:
        m = {"p": st.p, "U": st.U, "S": st.S, "Vh": st.Vh, "FB": st.FB, "FA": st.FA}
        if grows(ctl):
            m["blocks"] = list(st.blocks)
        if st.original is not None:
            m["original"] = st.original
        if st.residual is not None:
            m["residual"] = st.residual
        sd["modules"][st.layer.name] = m
    if ctl.importance is not None:
        sd["importance"] = ctl.importance.flat_state()
    if ctl.schedule is not None and ctl.schedule.stateful:
        sd["schedule"] = ctl.schedule.state_dict()
    return sd


def saved_capacity(st, m: dict) -> int:
    """Directions a saved module entry caches (its U's width; more than K0 after a refresh)."""
    U = m.get("U")
    return int(U.shape[1]) if torch.is_tensor(U) and U.dim() == 2 else st.K


def _check_blocks(st, m: dict, refresh: bool) -> tuple[int, int]:
    """(cached directions, how many of them come from the ORIGINAL weight's SVD) of a saved
    module entry; raises if its refreshed blocks do not fit the config."""
    name, K = st.layer.name, saved_capacity(st, m)
    blocks = m.get("blocks", [])
    if not refresh:
        if blocks:
            raise CheckpointMismatchError(
                f"{name}: saved with refreshed directions, but "
                "the exhaustion strategy does not grow the cache"
            )
        return st.K, st.K
    ok = isinstance(blocks, list) and all(
        isinstance(b, int) and not isinstance(b, bool) for b in blocks
    )
    fits = (min(st.layer.r, st.K0) <= blocks[0] and blocks[-1] < K) if ok and blocks else K == st.K0
    if not ok or blocks != sorted(blocks) or not fits:
        raise CheckpointMismatchError(
            f"{name}: refreshed blocks {blocks!r} do not fit {K} cached directions"
        )
    return K, blocks[0] if blocks else st.K0


def first(names, k: int = 3) -> list:
    """The first ``k`` of ``names``, sorted: what an error message lists."""
    return sorted(names)[:k]


def check_state(ctl, sd: dict) -> None:
    """Raise CheckpointMismatchError naming the first difference between ``sd`` and what
    ``ctl`` can load: keys, config, modules, pointers, shapes, half-precision state, the base
    model's singular values, the importance state. Reads only."""
    for key in ("config", "global_step", "num_switches", "history", "modules"):
        if key not in sd:
            raise CheckpointMismatchError(f"controller state lacks {key!r}")
    check_config(sd["config"], ctl.config)
    if ctl.schedule is not None and ctl.schedule.stateful:
        why = ctl.schedule.check_state(sd.get("schedule"))
        if why:
            raise CheckpointMismatchError(f"controller state {why}")
    refresh = grows(ctl)
    names = [st.layer.name for st in ctl.modules]
    if set(sd["modules"]) != set(names):
        raise CheckpointMismatchError(
            f"adapted modules differ: only saved {first(set(sd['modules']) - set(names))}, "
            f"only current {first(set(names) - set(sd['modules']))}"
        )
    for st in ctl.modules:
        m, name = sd["modules"][st.layer.name], st.layer.name
        K, K_orig = _check_blocks(st, m, refresh)
        p = m.get("p")
        if not (
            isinstance(p, int) and not isinstance(p, bool) and min(st.layer.r, st.K0) <= p <= K
        ):
            raise CheckpointMismatchError(
                f"{name}: pointer {p!r} out of range [{min(st.layer.r, st.K0)}, {K}]"
            )
        for key, want in st.state_shapes(p, K).items():  # the ledger: its written part
            if key not in m or tuple(m[key].shape) != want:
                raise CheckpointMismatchError(
                    f"{name}.{key}: saved {tuple(m[key].shape) if key in m else 'nothing'}, "
                    f"expected {want} at pointer {p}"
                )
        for key in ("original", "residual"):  # half-precision state (half_fusion)
            have = getattr(st, key)
            if (have is not None) != (key in m):
                raise CheckpointMismatchError(
                    f"{name}: {key} of the half-precision weight present in "
                    f"{'model' if have is not None else 'checkpoint'} only (half_fusion or base "
                    "dtype differs)"
                )
            if have is not None and (m[key].shape != have.shape or m[key].dtype != have.dtype):
                raise CheckpointMismatchError(
                    f"{name}.{key}: saved {tuple(m[key].shape)} {m[key].dtype}, current "
                    f"{tuple(have.shape)} {have.dtype}"
                )
        # same base model: the SVD of the original weight is the same (to SVD rounding)
        n0 = min(K_orig, st.K0)  # refreshed directions come from the trained weight
        if not torch.allclose(
            m["S"][:n0].float().cpu(),
            st.S[:n0].float().cpu(),
            rtol=1e-3,
            atol=1e-6 * float(st.S.abs().max().clamp_min(1e-30)),
        ):
            raise CheckpointMismatchError(
                f"{name}: the singular values of the original weight differ from the saved ones:"
                " the checkpoint was made on another base model"
            )
    for stack in {id(st.stack): st.stack for st in ctl.modules}.values():
        got = {
            (saved_capacity(st, sd["modules"][st.layer.name]), sd["modules"][st.layer.name]["p"])
            for st in stack.members
        }
        if len(got) > 1:
            raise CheckpointMismatchError(
                f"modules of one shape saved with different (cached directions, pointer): "
                f"{sorted(got)} (e.g. {stack.members[0].layer.name!r})"
            )
    if ctl.importance is not None:
        imp = sd.get("importance")
        if not isinstance(imp, dict) or any(
            k not in imp for k in ("ibar", "ubar", "updates", "skipped")
        ):
            raise CheckpointMismatchError("controller state lacks the importance state")
        for key in ("ibar", "ubar"):
            if imp[key].numel() != ctl.importance.numel:
                raise CheckpointMismatchError(
                    f"importance {key} has {imp[key].numel()} elements, "
                    f"the model needs {ctl.importance.numel}"
                )


@torch.no_grad()
def load_state(ctl, sd: dict) -> None:
    """Check ``sd`` (:func:`check_state`), then write it into ``ctl``."""
    check_state(ctl, sd)
    from .refresh import resize

    for stack in {id(st.stack): st.stack for st in ctl.modules}.values():
        st0 = stack.members[0]
        K = saved_capacity(st0, sd["modules"][st0.layer.name])
        if K != stack.K:  # a refreshed cache: make room (the load writes every entry in use)
            resize(stack, K, 0)
    for st in ctl.modules:
        st.load(sd["modules"][st.layer.name])
    if ctl.schedule is not None:
        ctl.schedule.load_state_dict(sd.get("schedule", {}))
    if ctl.importance is not None:
        ctl.importance.load_flat_state(sd["importance"])
    ctl.global_step = int(sd["global_step"])
    ctl.num_switches = int(sd["num_switches"])
    ctl.total_steps = sd.get("total_steps", ctl.total_steps)
    ctl.history = list(sd["history"])
