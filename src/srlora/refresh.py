"""``SRLoRAConfig(exhaustion="refresh")``: new directions once a module's cache is used up.

The paper stops switching a module once its ``r_target`` directions are consumed. With
``"refresh"``, a switch that finds a module with fewer than ``r'`` unused directions first
computes the top ``b`` singular directions of the module's CURRENT frozen weight (``b`` = the
first block's ``K0 - r`` new directions, at least ``r'``, at most ``min(m, n)``), writes them into
the cache at positions ``p .. p+b-1`` (the unused tail of the previous block, if any, is dropped:
it was never subtracted) and switches as usual. Everything else follows from the cache: the
switch subtracts ``s*B_new@A_new`` (the PiSSA factors of the new directions) from the frozen
part and puts the same product into the slot, so the output is unchanged; the export
``W0 + s*[B | FB | -B_sub] @ [A; FA; A_sub]`` reads directions ``0 .. p-1`` of the cache,
refreshed ones included, so it stays exact; the state dict saves the grown cache and where each
block starts (``blocks``), so resume is bitwise.

The frozen weight is ``W`` itself with ``fusion="weight"`` (joined with its int8 residual, or
rebuilt in fp32 from the original copy, per ``half_fusion``) and ``W0 + s*(FB@FA - B_sub@A_sub)``
in fp32 with ``fusion="virtual"`` (the base weight is still W0 there). Its SVD uses the config's
SVD settings; under torch.distributed rank 0's result is broadcast, so every rank appends
bitwise the same directions.

Planning (:func:`plan_refresh`) reads only; :func:`apply_refresh` grows the stacks (and a
virtual side path's buffers) and writes the new block. Neither touches the model's function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .distributed import broadcast_from_rank0
from .fusion import frozen_weight
from .module_state import ModuleState, StateStack
from .svd import top_singular_directions_many


class StackRefresh(NamedTuple):
    """A planned refresh of one state stack: its members start the new block at ``p`` with
    ``U`` (G x m x b), ``S`` (G x b), ``Vh`` (G x b x n) on the store device."""

    stack: StateStack
    p: int
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def block_size(st: ModuleState, k: int) -> int:
    """Directions one refresh computes for ``st``: the first block's ``K0 - r0`` (at least
    ``k``), at most ``min(m, n)``; below ``k`` the module cannot be refreshed. A module whose
    first block had no direction beyond the initial ``r`` (``r >= min(r_target, m, n)``: the
    adapter already spans the weight, whose frozen part is then zero) is never refreshed: it
    never switches, as under "stop"."""
    r0 = min(st.layer.r, st.K0)
    if st.K0 <= r0:
        return 0
    return min(max(st.K0 - r0, k), min(st.stack.shape))


def needs_refresh(st: ModuleState, k: int) -> bool:
    """Fewer than ``k`` unused directions, and a refresh can supply ``k``."""
    return st.p + k > st.K and block_size(st, k) >= k


def stacks_at_one_pointer(modules: list[ModuleState], idx: list[int]) -> list[StateStack]:
    """The stacks with a member in ``idx``; raises unless each stack's members share a pointer
    (as the switches keep them)."""
    stacks: dict[int, StateStack] = {}
    for i in idx:
        stacks.setdefault(id(modules[i].stack), modules[i].stack)
    for stack in stacks.values():
        if len({st.p for st in stack.members}) > 1:
            raise RuntimeError(
                f"SRLoRA refresh: the modules of one shape are at different "
                f"pointers {sorted({st.p for st in stack.members})}; nothing was "
                "changed"
            )
    return list(stacks.values())


def plan_refresh(modules: list[ModuleState], idx: list[int], k: int, cfg) -> list[StackRefresh]:
    """The new block of every stack with a member in ``idx``: the top directions of its
    members' current frozen weights (``cfg``: the SVD settings). Reads only."""
    plans = []
    for stack in stacks_at_one_pointer(modules, idx):
        sts = stack.members
        p = sts[0].p
        b = block_size(sts[0], k)
        res = top_singular_directions_many(
            [frozen_weight(st) for st in sts],
            [b] * len(sts),
            cfg.svd_method,
            cfg.svd_oversample,
            cfg.svd_niter,
            cfg.svd_seed,
            names=[f"{st.layer.name} (frozen weight at refresh)" for st in sts],
        )
        store = stack.U.device
        U, S, Vh = (torch.stack([r[j] for r in res]).to(store) for j in range(3))
        U, S, Vh = broadcast_from_rank0([U, S, Vh])
        plans.append(StackRefresh(stack, p, U, S, Vh))
    return plans


def grow_side(st: ModuleState) -> None:
    """Make room in a virtual side path for ``st.K`` directions (``2K - r0`` rows), keeping the
    rows in use. The hook reads the buffers from the side object at every call."""
    side = st.side
    cap = side.r0 + 2 * (st.K - side.r0)
    if side.Bt.shape[0] >= cap:
        return
    Bt = torch.empty(cap, side.Bt.shape[1], dtype=side.Bt.dtype, device=side.Bt.device)
    At = torch.empty(cap, side.At.shape[1], dtype=side.At.dtype, device=side.At.device)
    Bt[: side.R], At[: side.R] = side.Bt[: side.R], side.At[: side.R]
    side.Bt, side.At = Bt, At


def resize(stack: StateStack, K: int, keep: int) -> None:
    """Grow ``stack`` to ``K`` cached directions (and its members' side paths)."""
    stack.resize(K, keep)
    for st in stack.members:
        if st.side is not None:
            grow_side(st)


@torch.no_grad()
def apply_refresh(modules: list[ModuleState], plans: list[StackRefresh]) -> list[int]:
    """Write each planned block into its stack at ``p``; returns the refreshed modules."""
    done = []
    for pl in plans:
        b = pl.U.shape[-1]
        resize(pl.stack, pl.p + b, pl.p)
        pl.stack.U[:, :, pl.p :] = pl.U
        pl.stack.S[:, pl.p :] = pl.S
        pl.stack.Vh[:, pl.p :] = pl.Vh
        for st in pl.stack.members:
            st.blocks.append(pl.p)
            done.append(st)
    index = {id(st): i for i, st in enumerate(modules)}
    return sorted(index[id(st)] for st in done)
