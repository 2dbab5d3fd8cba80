"""The switch, as the paper's steps: score the pairs, choose the lowest, fuse them into the frozen
weight, reinitialize their slots from the next singular directions, reset the optimizer state and
the importance of what changed.

:func:`plan_switch` does steps 1-2 and prepares the new factors for every module without writing
anything (so a failure there leaves the whole run as it was); :func:`apply_switch` does steps 3-5.
Modules of one state stack, scaling, dtype and device are switched together: one stacked op per
step instead of one per module (a 112-module Llama is 3 groups).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from .factors import lowest_pairs, pair_scores, pissa_factors, switch_factors
from .fusion import fuse_into_weight
from .module_state import next_directions, write_ledger
from .optimizer_state import apply_policy

if TYPE_CHECKING:
    from .controller import SRLoRAController


class GroupSwitch(NamedTuple):
    """One group's planned switch, stacked over its modules ``idx`` (on the device): copies of
    the factors ``B`` G x m x r / ``A`` G x r x n (the new pairs are written into them, then
    copied back), ``slots`` G x k (ascending), ``scores`` G x r, the fused pairs ``B_low`` /
    ``A_low``, the new pairs ``B_new`` / ``A_new`` (fp32) and the weight change's factors
    ``Bc`` / ``Ac``; ``at`` indexes the chosen (module, slot) pairs of the stacks. With
    ``insertion="gradient"``: the new directions ``U_new`` / ``Vh_new`` (written into the cache
    at ``p``) and per module whether it used a gradient (``gradient``); else None."""

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
    U_new: Optional[torch.Tensor] = None
    Vh_new: Optional[torch.Tensor] = None
    gradient: Optional[list] = None


def switch_groups(ctl: "SRLoRAController", todo: list[int]) -> list[list[int]]:
    """``todo`` split into groups that can be stacked: one state stack (so one shape, rank and
    store), and the same dtypes, devices and scaling."""
    groups: dict = {}
    for i in todo:
        L = ctl.layers[i]
        key = (id(ctl.modules[i].stack), L.scaling) + tuple(
            (t.dtype, t.device) for t in (L.base_weight, L.lora_A, L.lora_B))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def group_pair_scores(ctl: "SRLoRAController", idx: list[int]) -> torch.Tensor:
    """Step 1, per-pair importance of modules ``idx`` (one group): ``G x r`` fp32,
    ``S_j = mean_i score(B[i, j]) + mean_l score(A[j, l])``."""
    G, r = len(idx), ctl.layers[idx[0]].r
    sA = ctl.importance.scores_many([ctl.importance_name(i, "A") for i in idx]).reshape(G, r, -1)
    sB = ctl.importance.scores_many([ctl.importance_name(i, "B") for i in idx]).reshape(G, -1, r)
    return pair_scores(sB, sA)


def last_written(ctl: "SRLoRAController", idx: list[int]) -> list[list[int]]:
    """Per module of ``idx``: the slots written at its most recent switch (none before the
    first), read from the switch history."""
    todo, out = set(idx), {}
    for entry in reversed(ctl.history):
        for i, slots in zip(entry["modules"], entry["slots"]):
            if i in todo and i not in out:
                out[i] = slots
        if len(out) == len(todo):
            break
    return [out.get(i, []) for i in idx]


def selection_scores(policy: str, scores: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                     young: list[list[int]]) -> torch.Tensor:
    """Step 2's ranking key (``G x r``; the lowest are fused), per ``SRLoRAConfig.selection``.

    ``"importance"``: the pair scores. ``"normalized"``: the scores divided by the pair's squared
    scale ``(|B_j| |A_j|)^2``. ``"protect"``: the scores, with the slots in ``young`` (written at
    the module's previous switch) ranked after every other slot, in their own score order.
    """
    if policy == "normalized":
        scale = B.float().pow(2).sum(-2) * A.float().pow(2).sum(-1)  # (|B_j| |A_j|)^2, G x r
        return scores / scale.clamp_min(torch.finfo(torch.float32).tiny)
    if policy == "protect" and any(young):
        mask = torch.zeros(scores.shape, dtype=torch.bool)
        for g, slots in enumerate(young):
            mask[g, slots] = True
        mask = mask.to(scores.device)
        span = (scores.amax(-1, keepdim=True) - scores.amin(-1, keepdim=True)).add_(1.0)
        return scores + mask * span
    return scores


def ranking_keys(ctl: "SRLoRAController", idx: list[int], B=None, A=None,
                 scores=None) -> torch.Tensor:
    """Step 2's ranking key of modules ``idx`` (one group, ``G x r``; the lowest are fused), per
    the config's selection. ``B``/``A`` (stacked factors) are read only for "normalized"; the
    adaptive schedule calls this every step to see whether the choice has settled."""
    if scores is None:
        scores = group_pair_scores(ctl, idx)
    policy = ctl.config.selection
    if policy == "normalized" and B is None:
        B = torch.stack([ctl.layers[i].B() for i in idx])
        A = torch.stack([ctl.layers[i].A() for i in idx])
    young = last_written(ctl, idx) if policy == "protect" else []
    return selection_scores(policy, scores, B, A, young)


def check_module(ctl: "SRLoRAController", i: int, k: int) -> None:
    """Raise before any write if module i cannot be switched as set up (its factors were
    reshaped or replaced since ``wrap``, or too few directions are left)."""
    L, st = ctl.layers[i], ctl.modules[i]
    (m, n), r = st.stack.shape, st.stack.r
    got = (tuple(L.B().shape), tuple(L.A().shape), tuple(L.shape))
    if got != ((m, r), (r, n), (m, n)):
        raise RuntimeError(f"SRLoRA switch: module {L.name!r} has B {got[0]}, A {got[1]}, W "
                           f"{got[2]}; set up with B {(m, r)}, A {(r, n)}, W {(m, n)}. Its LoRA "
                           "factors were replaced or resized after srlora.wrap; nothing was "
                           "changed")
    if st.p + k > st.K:
        raise RuntimeError(f"SRLoRA switch: module {L.name!r} has {st.K - st.p} unused "
                           f"directions, {k} needed")


def plan_group(ctl: "SRLoRAController", idx: list[int], k: int,
               grads: Optional[dict] = None) -> GroupSwitch:
    """Steps 1-2 for one group, and the factors steps 3-4 will write. Reads only. ``grads``
    (``insertion="gradient"``): module index -> its weight gradient of the last step."""
    Ls = [ctl.layers[i] for i in idx]
    s = Ls[0].scaling
    B, A = torch.stack([L.B() for L in Ls]), torch.stack([L.A() for L in Ls])  # G x m x r, ...
    scores = group_pair_scores(ctl, idx)
    key = ranking_keys(ctl, idx, B, A, scores)
    slots = lowest_pairs(key, k).to(B.device)  # step 2: the k lowest, ascending
    at = (torch.arange(len(idx), device=B.device)[:, None], slots)  # (g, slot) pairs, G x k
    B_low, A_low = B.transpose(1, 2)[at].transpose(1, 2).float(), A[at].float()
    U, S, Vh = next_directions([ctl.modules[i] for i in idx], k, B.device)
    used = None
    if grads is not None:  # insertion="gradient": the directions, at the paper's scale S
        from .insertion import group_directions
        U, Vh, used = group_directions([grads.get(i) for i in idx], B, A, slots, U, Vh)
    B_new, A_new = pissa_factors(U, S, Vh, s)
    Bc, Ac = switch_factors(B_low, A_low, B_new, A_new)
    return GroupSwitch(idx, B, A, at, slots, scores, B_low, A_low, B_new, A_new, Bc, Ac,
                       *((U, Vh, used) if grads is not None else ()))


def plan_switch(ctl: "SRLoRAController", todo: list[int], k: int,
                grads: Optional[dict] = None) -> list[GroupSwitch]:
    """Check every module and plan every group; nothing is written."""
    for i in todo:
        check_module(ctl, i, k)
    return [plan_group(ctl, idx, k, grads) for idx in switch_groups(ctl, todo)]


@torch.no_grad()
def apply_group(ctl: "SRLoRAController", g: GroupSwitch, k: int) -> None:
    """Steps 3-5 for one planned group."""
    Ls = [ctl.layers[i] for i in g.idx]
    if g.U_new is not None:  # insertion="gradient": the cache holds what is subtracted
        for j, i in enumerate(g.idx):
            st = ctl.modules[i]
            st.U[:, st.p:st.p + k] = g.U_new[j].to(st.U.device)
            st.Vh[st.p:st.p + k] = g.Vh_new[j].to(st.Vh.device)
    for j, i in enumerate(g.idx):  # step 3: fuse (and subtract the new pairs): W + s*B@A kept
        fuse_into_weight(ctl.modules[i], k, g.Bc[j], g.Ac[j], g.B_low[j], g.A_low[j],
                         g.B_new[j], g.A_new[j])
    B, A, at = g.B, g.A, g.at  # step 4: the new pairs in their slots
    B.transpose(1, 2)[at] = g.B_new.transpose(1, 2).to(B.dtype)
    A[at] = g.A_new.to(A.dtype)
    torch._foreach_copy_([L.B() for L in Ls] + [L.A() for L in Ls],
                         list(B.unbind(0)) + list(A.unbind(0)))
    hit = torch.zeros(len(Ls), Ls[0].r, dtype=torch.bool, device=B.device)
    hit[at] = True
    if ctl.optimizer is not None:  # step 5: optimizer state and importance of what changed
        apply_policy(ctl.config.optimizer_state, ctl.optimizer, Ls, hit)
    names = [(ctl.importance_name(i, "A"), ctl.importance_name(i, "B")) for i in g.idx]
    if ctl.config.importance_reset == "module":
        ctl.importance.reset_many([n for pair in names for n in pair])
    else:
        for j, (nA, nB) in enumerate(names):
            ctl.importance.reset(nA, g.slots[j], dim=0)
            ctl.importance.reset(nB, g.slots[j], dim=1)


def write_ledgers(ctl: "SRLoRAController", plans: list[GroupSwitch]) -> None:
    """Store each group's fused pairs (fp32) in its ledger: one copy to each store device, then
    one write per factor and stack (``half_fusion="original"`` groups wrote theirs while
    fusing)."""
    by_store: dict = {}
    for g in plans:
        sts = [ctl.modules[i] for i in g.idx]
        if all(st.original is None for st in sts):
            by_store.setdefault(sts[0].U.device, []).append((sts, g.B_low, g.A_low))
    for store, items in by_store.items():
        flat = torch.cat([t.reshape(-1) for _, B, A in items for t in (B, A)]).to(store)
        off = 0
        for sts, B, A in items:
            nb, na = B.numel(), A.numel()
            write_ledger(sts, flat[off:off + nb].view(B.shape),
                         flat[off + nb:off + nb + na].view(A.shape))
            off += nb + na


def apply_switch(ctl: "SRLoRAController", plans: list[GroupSwitch], k: int) -> dict:
    """Steps 3-5 for every planned group; the ledger; returns the history entry (one host sync
    for the chosen slots and their scores)."""
    for g in plans:
        apply_group(ctl, g, k)
    write_ledgers(ctl, plans)
    todo = sorted(i for g in plans for i in g.idx)
    order, dev0 = [i for g in plans for i in g.idx], plans[0].slots.device
    low = dict(zip(order, torch.cat([g.slots.to(dev0) for g in plans]).cpu().tolist()))
    sc = dict(zip(order, torch.cat([g.scores.to(dev0) for g in plans]).cpu().tolist()))
    entry = {"step": ctl.global_step, "modules": todo, "slots": [low[i] for i in todo],
             "directions": [list(range(ctl.modules[i].p - k, ctl.modules[i].p)) for i in todo],
             "scores": [sc[i] for i in todo]}
    if plans[0].gradient is not None:  # insertion="gradient": which modules had a gradient
        used = {i: u for g in plans for i, u in zip(g.idx, g.gradient)}
        entry["gradient"] = [used[i] for i in todo]
    if ctl.config.optimizer_state == "rewarm" and ctl.optimizer is not None:
        # Adam's step count at the restart: "rewarm" counts each slot's bias correction from it
        from .rewarm import adam_step_count
        entry["optimizer_step"] = adam_step_count(ctl.optimizer, ctl.layers[todo[0]].lora_A) or 0
    return entry
