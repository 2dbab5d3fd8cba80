"""Mechanism diagnostics of one trained adapter: what SRLoRA's switches did, and how many
directions the total change of each weight uses (for every method).

Everything here reads only the controller's public API (``history``, ``layers``, ``modules``,
``delta_factors``, ``config``) and is otherwise pure functions over tensors and lists.

Definitions (also in docs/compare.md, "Mechanism diagnostics"):

- a **fused pair** is one (B column, A row) that a switch folded into the frozen weight; pairs
  are numbered per module in the order they were fused, which is the order of the ledger
  (``modules[i].FB[:, f]``, ``modules[i].FA[f]``);
- its **age**: the optimizer step of the switch that fused it minus the step at which its slot
  was last written (0 = written at set-up);
- **new**: its slot was written at the module's previous switch (so it lived one interval);
- its **direction**: the index d of the singular direction of the original weight that the slot
  held when it was written (set-up: slot j holds direction j);
- **moved**: ``||B_j A_j - B0_j A0_j||_F / ||B0_j A0_j||_F``, where ``B0_j A0_j`` is the pair's
  initial product, the PiSSA factors of direction d (``s * B0 A0 = S_d u_d v_d^T``);
- **survivors**: inserted directions that were NOT fused at the module's next switch, out of
  the directions inserted at a switch that has a next switch for that module. The directions that
  were fused right away ("churn") are the fusions whose slot was written at the previous switch,
  counted as in /work/shared/docs/evidence.md;
- **spectrum**: the singular values of the total change ``W_final - W0 = s * Bd @ Ad`` of each
  module, from its exact low-rank factors (QR of both, SVD of the small core; fp64);
- **effective rank**: ``exp(H(p))`` with ``p_i = sigma_i / sum(sigma)``, the entropy effective
  rank of Roy & Vetterli (2007); also the number of singular values holding 90% and 99% of the
  energy ``sum(sigma_i^2)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from srlora.factors import pissa_factors

SPECTRUM_TOP = 64  # singular values kept per module in the record


# ----------------------------------------------------------------------------- spectra
def spectrum_from_factors(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values (fp64, descending) of ``scaling * B @ A`` (B m x k, A k x n), without
    forming the m x n product: ``B = Q1 R1``, ``A^T = Q2 R2``, so ``B A = Q1 (R1 R2^T) Q2^T``
    and the singular values are those of the k x k core ``R1 R2^T``."""
    B, A = B.detach().double(), A.detach().double()
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"factors do not chain: B {tuple(B.shape)}, A {tuple(A.shape)}")
    if B.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    R1 = torch.linalg.qr(B, mode="r").R
    R2 = torch.linalg.qr(A.T, mode="r").R
    return torch.linalg.svdvals(R1 @ R2.T).mul_(abs(scaling)).cpu()


def effective_rank(sv: torch.Tensor) -> dict:
    """Entropy effective rank (Roy & Vetterli 2007) and the 90% / 99% energy counts of the
    singular values ``sv`` (all of them, not a truncated list). A zero change has rank 0."""
    sv = sv.double().clamp_min(0)
    total = float(sv.sum())
    if total == 0.0:
        return {"erank": 0.0, "energy90": 0, "energy99": 0}
    p = sv / total
    nz = p[p > 0]
    erank = math.exp(float(-(nz * nz.log()).sum()))
    e = torch.cumsum(sv.square().sort(descending=True).values, 0)
    e = e / e[-1]

    def count(frac: float) -> int:
        return int(torch.searchsorted(e, torch.tensor(frac - 1e-12, dtype=e.dtype))) + 1

    return {"erank": erank, "energy90": count(0.9), "energy99": count(0.99)}


# ----------------------------------------------------------------------------- the schedule
def fused_pair_schedule(history: Sequence[dict], initial: Sequence[int]) -> list[list[dict]]:
    """Per module, its fused pairs in ledger order, from the switch history alone.

    ``history``: the controller's entries (``step``, ``modules``, ``slots``, ``directions``);
    ``initial[i]``: the directions module i's slots held at set-up (``min(r, K)``; slot j held
    direction j). Each pair: ``switch`` (1-based index in ``history``), ``step``, ``slot``,
    ``direction``, ``written`` (step its slot was last written), ``age``, ``new``.
    """
    slot_dir = [{j: j for j in range(r0)} for r0 in initial]
    written = [dict.fromkeys(range(r0), (0, 0)) for r0 in initial]  # slot -> (switch, step)
    prev = [0] * len(initial)  # the module's previous switch (0 = set-up)
    out: list[list[dict]] = [[] for _ in initial]
    for n, e in enumerate(history, 1):
        for i, slots, dirs in zip(e["modules"], e["slots"], e["directions"]):
            for slot, d in zip(slots, dirs):  # slot slots[q] receives direction dirs[q]
                w_switch, w_step = written[i].get(slot, (0, 0))
                out[i].append(
                    {
                        "switch": n,
                        "step": e["step"],
                        "slot": slot,
                        "direction": slot_dir[i].get(slot),
                        "written": w_step,
                        "age": e["step"] - w_step,
                        "new": prev[i] > 0 and w_switch == prev[i],
                    }
                )
                slot_dir[i][slot] = d
                written[i][slot] = (n, e["step"])
            prev[i] = n
    return out


def survivors(history: Sequence[dict]) -> dict:
    """How many directions inserted at a switch outlived the module's next switch.

    ``inserted``: directions inserted at any switch; ``at_risk``: those inserted at a switch
    after which the module switched again; ``fused_next``: of those, fused at that next switch
    (the churn of evidence.md: fusions whose slot was written at the previous switch);
    ``survived = at_risk - fused_next``; ``fused_after_first``: fusions at the module's second
    and later switches (the denominator evidence.md uses)."""
    per_module: dict[int, list[tuple[int, list[int]]]] = {}
    for n, e in enumerate(history, 1):
        for i, slots in zip(e["modules"], e["slots"]):
            per_module.setdefault(i, []).append((n, list(slots)))
    inserted = at_risk = fused_next = after_first = 0
    for seq in per_module.values():
        for k, (_, slots) in enumerate(seq):
            inserted += len(slots)
            if k + 1 < len(seq):
                at_risk += len(slots)
                fused_next += len(set(slots) & set(seq[k + 1][1]))
            if k > 0:
                after_first += len(slots)
    return {
        "inserted": inserted,
        "at_risk": at_risk,
        "fused_next": fused_next,
        "survived": at_risk - fused_next,
        "fused_after_first": after_first,
        "survived_frac": (at_risk - fused_next) / at_risk if at_risk else None,
    }


# ----------------------------------------------------------------------------- moved-ness
def pair_moved(b: torch.Tensor, a: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor) -> float:
    """``||b a^T - b0 a0^T||_F / ||b0 a0^T||_F`` (fp64) without forming m x n matrices and
    without cancellation: ``b a^T - b0 a0^T = [b - b0, b0] [a, a - a0]^T``, a rank-2 product
    whose squared norm is the sum of the entries of ``(X^T X) * (Y^T Y)``."""
    b, a, b0, a0 = (t.detach().double().reshape(-1) for t in (b, a, b0, a0))
    X = torch.stack([b - b0, b0], 1)
    Y = torch.stack([a, a - a0], 1)
    num = float(((X.T @ X) * (Y.T @ Y)).sum().clamp_min(0)).__pow__(0.5)
    den = float(b0.norm() * a0.norm())
    return num / den if den > 0 else float("nan")


def fused_moved(module, pairs: list[dict], scaling: float) -> list[float]:
    """Moved-ness of each fused pair of one module (``module``: ``controller.modules[i]``)."""
    FB, FA = module.FB, module.FA
    if FB.shape[1] != len(pairs):
        raise ValueError(
            f"the ledger holds {FB.shape[1]} fused pairs but the history has {len(pairs)}"
        )
    out = []
    for f, pr in enumerate(pairs):
        d = pr["direction"]
        if d is None:  # a slot left empty at set-up (K < r): no initial product
            out.append(float("nan"))
            continue
        U, S, Vh = (t.detach().double().cpu() for t in (module.U[:, d], module.S[d], module.Vh[d]))
        b0, a0 = pissa_factors(U[:, None], S[None], Vh[None], scaling)
        out.append(pair_moved(FB[:, f].cpu(), FA[f].cpu(), b0[:, 0], a0[0]))
    return out


# ----------------------------------------------------------------------------- the record
def _r(x: Optional[float], digits: int = 4) -> Optional[float]:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _spectrum_entry(sv: torch.Tensor, top: int) -> dict:
    """One module's spectrum entry: its top singular values and effective ranks, rounded."""
    er = effective_rank(sv)
    return {
        "sv": [_r(float(v)) for v in sv[:top]],
        "erank": _r(er["erank"]),
        "energy90": er["energy90"],
        "energy99": er["energy99"],
    }


def _spectrum_means(spectra: list[dict]) -> dict:
    """The modules' mean effective ranks ({} without modules)."""
    if not spectra:
        return {}
    n = len(spectra)
    keys = ("erank", "energy90", "energy99")
    return {f"{k}_mean": _r(sum(s[k] for s in spectra) / n) for k in keys}


@torch.no_grad()
def collect(controller, top: int = SPECTRUM_TOP) -> dict:
    """The ``diagnostics`` entry of a run record (compact, JSON-ready).

    ``modules``: adapted module names (pairs refer to them by index); ``pairs``: every fused pair
    (``m`` module index, ``sw`` switch, ``step``, ``slot``, ``dir``, ``age``, ``new``,
    ``moved``); ``summary``: survivors and the pairs' ages and moved-ness; ``spectra``: per module
    the top ``top`` singular values of ``W_final - W0`` and its effective ranks, and their mean
    over modules in ``summary``.
    """
    layers = controller.layers
    method = controller.config.method
    pairs: list[dict] = []
    if method == "srlora":
        initial = [min(L.r, st.K) for L, st in zip(layers, controller.modules)]
        sched = fused_pair_schedule(controller.history, initial)
        for i, (L, st, prs) in enumerate(zip(layers, controller.modules, sched)):
            for pr, mv in zip(prs, fused_moved(st, prs, L.scaling)):
                pairs.append(
                    {
                        "m": i,
                        "sw": pr["switch"],
                        "step": pr["step"],
                        "slot": pr["slot"],
                        "dir": pr["direction"],
                        "age": pr["age"],
                        "new": pr["new"],
                        "moved": _r(mv),
                    }
                )
    spectra = []
    for i, L in enumerate(layers):
        Bd, Ad = controller.delta_factors(i)
        sv = spectrum_from_factors(Bd, Ad, L.scaling)
        spectra.append(_spectrum_entry(sv, top))
    summary: dict = {"method": method, "fused_pairs": len(pairs)}
    if method == "srlora":
        summary.update(survivors(controller.history))
        if pairs:
            ages = torch.tensor([p["age"] for p in pairs], dtype=torch.float64)
            moved = torch.tensor(
                [p["moved"] for p in pairs if p["moved"] is not None], dtype=torch.float64
            )
            summary.update(
                {
                    "age_mean": _r(float(ages.mean())),
                    "age_median": _r(float(ages.median())),
                    "new_frac": _r(sum(p["new"] for p in pairs) / len(pairs)),
                    "moved_median": _r(float(moved.median())) if len(moved) else None,
                }
            )
    summary.update(_spectrum_means(spectra))
    return {
        "modules": [L.name for L in layers],
        "summary": summary,
        "pairs": pairs,
        "spectra": spectra,
        "spectrum_top": top,
    }


@torch.no_grad()
def collect_full(model, initial: dict, top: int = SPECTRUM_TOP) -> dict:
    """The ``diagnostics`` entry of a full fine-tuning run: per module that adapters would
    target (``initial``: name -> weight before training), the spectrum and effective ranks of
    its total change ``W_final - W0`` (fp64; a convolution's weight as out x rest), and their
    means in ``summary``: how many directions an unconstrained update actually used."""
    weights = dict(model.named_modules())
    spectra = []
    for name, w0 in initial.items():
        d = (weights[name].weight.detach().double() - w0.double()).reshape(w0.shape[0], -1)
        sv = torch.linalg.svdvals(d).cpu()
        spectra.append(_spectrum_entry(sv, top))
    summary: dict = {"method": "full", "fused_pairs": 0}
    summary.update(_spectrum_means(spectra))
    return {
        "modules": list(initial),
        "summary": summary,
        "pairs": [],
        "spectra": spectra,
        "spectrum_top": top,
    }
