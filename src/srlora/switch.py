"""The switch, as the paper's steps: score the pairs, choose the lowest, fuse them into the frozen
weight, put new pairs in their slots (so ``W + s*B@A`` is unchanged), reset what changed.

The switch is narrow: it takes the modules' states, their factors (``B``, ``A``, stacked per
group, by a callable), a scoring function, the history and the step's strategies (selection,
insertion); it imports no variant and no controller. :func:`plan_switch` does steps 1-2 and
prepares the new factors for every module without writing anything (a failure there leaves the
run as it was); :func:`apply_switch` fuses (step 3) and writes the new pairs into the plan's
factor copies (step 4), the cache and the ledger. The caller then copies the factors back into
its parameters and resets the optimizer state and the importance of the hit slots (step 5):
the controller for plain parameters, srlora.fsdp for FSDP2's shards (which feeds the same two
functions with gathered tensors).

Modules of one state stack, scaling, dtype and device are switched together: one stacked op per
step instead of one per module (a 112-module Llama is 3 groups).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .factors import lowest_pairs, switch_factors
from .fusion import fuse_into_weight
from .module_state import ModuleState, next_directions, write_ledger

Factors = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]  # idx -> (B, A) stacked
Scores = Callable[[list[int]], torch.Tensor]  # idx -> G x r pair scores (fp32)


class GroupSwitch(NamedTuple):
    """One group's planned switch, stacked over its modules ``idx`` (on the device): copies of
    the factors ``B`` G x m x r / ``A`` G x r x n (the new pairs are written into them by
    :func:`apply_switch`; the caller copies them back), ``slots`` G x k (ascending),
    ``scores`` G x r, the fused pairs ``B_low`` / ``A_low``, the new pairs ``B_new`` /
    ``A_new`` (fp32) and the weight change's factors ``Bc`` / ``Ac``; ``at`` indexes the
    chosen (module, slot) pairs of the stacks. ``U``/``S``/``Vh``: the new directions, written
    into the cache at ``p`` when ``written``; ``used``: per module whether it used a gradient
    (``insertion="gradient"``), else None."""

    idx: list[int]
    B: torch.Tensor
    A: torch.Tensor
    at: tuple
    slots: torch.Tensor
    scores: torch.Tensor
    B_low: torch.Tensor
    A_low: torch.Tensor
    B_new: torch.Tensor
    A_new: torch.Tensor
    Bc: torch.Tensor
    Ac: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    written: bool
    used: Optional[list]


def switch_groups(modules: list[ModuleState], todo: list[int]) -> list[list[int]]:
    """``todo`` split into groups that can be stacked: one state stack (so one shape, rank and
    store), and the same dtypes, devices and scaling."""
    groups: dict = {}
    for i in todo:
        L = modules[i].layer
        key = (id(modules[i].stack), L.scaling) + tuple(
            (t.dtype, t.device) for t in (L.base_weight, L.lora_A, L.lora_B)
        )
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def young_slots(history: list[dict], idx: list[int]) -> list[list[int]]:
    """Per module of ``idx``: the slots written at its most recent switch (none before the
    first), read from the switch history."""
    todo, out = set(idx), {}
    for entry in reversed(history):
        for i, slots in zip(entry["modules"], entry["slots"]):
            if i in todo and i not in out:
                out[i] = slots
        if len(out) == len(todo):
            break
    return [out.get(i, []) for i in idx]


def ranking_keys(
    selection,
    scores: torch.Tensor,
    history: list[dict],
    idx: list[int],
    factors: Factors,
    B=None,
    A=None,
) -> torch.Tensor:
    """Step 2's ranking key of modules ``idx`` (one group, ``G x r``; the lowest are fused), per
    the selection strategy; the factors are read only when it needs them."""
    if selection.reads_factors and B is None:
        B, A = factors(idx)
    young = young_slots(history, idx) if selection.reads_young else []
    return selection.keys(scores, B, A, young)


def check_module(st: ModuleState, B: torch.Tensor, A: torch.Tensor, w_shape: tuple, k: int) -> None:
    """Raise before any write if module ``st`` cannot be switched as set up (its factors were
    reshaped or replaced since ``wrap``, or too few directions are left)."""
    (m, n), r = st.stack.shape, st.stack.r
    got = (tuple(B.shape), tuple(A.shape), tuple(w_shape))
    if got != ((m, r), (r, n), (m, n)):
        raise RuntimeError(
            f"SRLoRA switch: module {st.layer.name!r} has B {got[0]}, A {got[1]}, "
            f"W {got[2]}; set up with B {(m, r)}, A {(r, n)}, W {(m, n)}. Its LoRA "
            "factors were replaced or resized after srlora.wrap; nothing was "
            "changed"
        )
    if st.p + k > st.K:
        raise RuntimeError(
            f"SRLoRA switch: module {st.layer.name!r} has {st.K - st.p} unused "
            f"directions, {k} needed"
        )


def plan_group(
    modules: list[ModuleState],
    idx: list[int],
    k: int,
    B: torch.Tensor,
    A: torch.Tensor,
    scores: torch.Tensor,
    history: list[dict],
    selection,
    insertion,
    grads: Optional[dict],
    step: int,
) -> GroupSwitch:
    """Steps 1-2 for one group (``B``, ``A``: copies of its stacked factors; ``scores``: its
    pair scores), and the factors steps 3-4 will write. Reads only."""
    s = modules[idx[0]].layer.scaling
    key = ranking_keys(selection, scores, history, idx, lambda _: (B, A), B, A)
    slots = lowest_pairs(key, k).to(B.device)  # step 2: the k lowest, ascending
    at = (torch.arange(len(idx), device=B.device)[:, None], slots)  # (g, slot) pairs, G x k
    B_low, A_low = B.transpose(1, 2)[at].transpose(1, 2).float(), A[at].float()
    U, S, Vh = next_directions([modules[i] for i in idx], k, B.device)
    ins = insertion.insert(
        U,
        S,
        Vh,
        s,
        B,
        A,
        slots,
        None if grads is None else [grads.get(i) for i in idx],
        [step * 100_003 + i for i in idx],
    )
    Bc, Ac = switch_factors(B_low, A_low, ins.B_new, ins.A_new)
    return GroupSwitch(
        idx,
        B,
        A,
        at,
        slots,
        scores,
        B_low,
        A_low,
        ins.B_new,
        ins.A_new,
        Bc,
        Ac,
        ins.U,
        ins.S,
        ins.Vh,
        ins.written,
        ins.used,
    )


def plan_switch(
    modules: list[ModuleState],
    todo: list[int],
    k: int,
    factors: Factors,
    scores: Scores,
    history: list[dict],
    selection,
    insertion,
    grads: Optional[dict] = None,
    step: int = 0,
    w_shapes: Optional[list] = None,
) -> list[GroupSwitch]:
    """Check every module and plan every group; nothing is written. ``factors(idx)``: copies
    of the groups' stacked factors (``G x m x r``, ``G x r x n``); ``scores(idx)``: their pair
    scores; ``w_shapes``: per module the frozen weight's shape (default: its layer's)."""
    plans = []
    for idx in switch_groups(modules, todo):
        B, A = factors(idx)
        for j, i in enumerate(idx):
            shape = modules[i].layer.shape if w_shapes is None else w_shapes[i]
            check_module(modules[i], B[j], A[j], shape, k)
        plans.append((idx, B, A))
    return [
        plan_group(modules, idx, k, B, A, scores(idx), history, selection, insertion, grads, step)
        for idx, B, A in plans
    ]


@torch.no_grad()
def apply_group(modules: list[ModuleState], g: GroupSwitch, k: int) -> None:
    """Steps 3-4 for one planned group: the cache (when the insertion chose its own
    directions), the frozen weights, the new pairs into the plan's factor copies."""
    if g.written:  # the cache holds what is subtracted: W0 + s*Bd@Ad stays exact
        for j, i in enumerate(g.idx):
            st = modules[i]
            st.U[:, st.p : st.p + k] = g.U[j].to(st.U.device)
            st.S[st.p : st.p + k] = g.S[j].to(st.S.device)
            st.Vh[st.p : st.p + k] = g.Vh[j].to(st.Vh.device)
    for j, i in enumerate(g.idx):  # step 3: fuse (and subtract the new pairs): W + s*B@A kept
        fuse_into_weight(
            modules[i], k, g.Bc[j], g.Ac[j], g.B_low[j], g.A_low[j], g.B_new[j], g.A_new[j]
        )
    g.B.transpose(1, 2)[g.at] = g.B_new.transpose(1, 2).to(g.B.dtype)  # step 4
    g.A[g.at] = g.A_new.to(g.A.dtype)


def hit_slots(g: GroupSwitch) -> torch.Tensor:
    """``G x r`` bool, true at the group's recomposed slots."""
    hit = torch.zeros(g.B.shape[0], g.B.shape[-1], dtype=torch.bool, device=g.B.device)
    hit[g.at] = True
    return hit


def write_ledgers(modules: list[ModuleState], plans: list[GroupSwitch]) -> None:
    """Store each group's fused pairs (fp32) in its ledger: one copy to each store device, then
    one write per factor and stack (``half_fusion="original"`` groups wrote theirs while
    fusing)."""
    by_store: dict = {}
    for g in plans:
        sts = [modules[i] for i in g.idx]
        if all(st.original is None for st in sts):
            by_store.setdefault(sts[0].U.device, []).append((sts, g.B_low, g.A_low))
    for store, items in by_store.items():
        flat = torch.cat([t.reshape(-1) for _, B, A in items for t in (B, A)]).to(store)
        off = 0
        for sts, B, A in items:
            nb, na = B.numel(), A.numel()
            write_ledger(
                sts,
                flat[off : off + nb].view(B.shape),
                flat[off + nb : off + nb + na].view(A.shape),
            )
            off += nb + na


def apply_switch(modules: list[ModuleState], plans: list[GroupSwitch], k: int, step: int) -> dict:
    """Steps 3-4 for every planned group and the ledger; returns the history entry (one host
    sync for the chosen slots and their scores)."""
    for g in plans:
        apply_group(modules, g, k)
    write_ledgers(modules, plans)
    todo = sorted(i for g in plans for i in g.idx)
    order, dev0 = [i for g in plans for i in g.idx], plans[0].slots.device
    low = dict(zip(order, torch.cat([g.slots.to(dev0) for g in plans]).cpu().tolist()))
    sc = dict(zip(order, torch.cat([g.scores.to(dev0) for g in plans]).cpu().tolist()))
    entry = {
        "step": step,
        "modules": todo,
        "slots": [low[i] for i in todo],
        "directions": [list(range(modules[i].p - k, modules[i].p)) for i in todo],
        "scores": [sc[i] for i in todo],
    }
    if plans[0].used is not None:  # insertion="gradient": which modules had a gradient
        used = {i: u for g in plans for i, u in zip(g.idx, g.used)}
        entry["gradient"] = [used[i] for i in todo]
    return entry


def reset_importance(
    importance, names: list[tuple[str, str]], slots: torch.Tensor, how: str
) -> None:
    """Step 5, the importance of what changed (``SRLoRAConfig.importance_reset``): "module"
    zeroes the whole state of each switched module's A and B, "slots" only the recomposed rows
    of A and columns of B. ``names``: per module (A's name, B's name); ``slots`` G x k."""
    if how == "module":
        importance.reset_many([n for pair in names for n in pair])
        return
    for j, (nA, nB) in enumerate(names):
        importance.reset(nA, slots[j], dim=0)
        importance.reset(nB, slots[j], dim=1)
