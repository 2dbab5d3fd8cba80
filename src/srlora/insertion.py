"""``SRLoRAConfig(insertion="gradient")``: new slots along the gradient the adapter cannot follow.

The paper fills a recomposed slot with the next singular direction of the pretrained weight.
The paper-claims study measured what that does (docs/study.md): 88% of inserted directions are
fused again at the next switch, barely trained, because a direction of W has no reason to matter
for the task. ``"gradient"`` inserts the directions the loss asks for instead:

* During the step before a switch (the step whose optimizer update the switch follows), a
  forward hook on each adapted layer accumulates its FULL weight gradient
  ``G = sum over tokens of dY^T X`` (``m x n`` fp32; with gradient accumulation, over every
  micro-batch), the gradient the frozen weight would get if it were trained.
* At the switch, after choosing the ``k`` slots to fuse, the part of ``G`` the kept slots can
  already follow is removed: an adapter with factors ``B``, ``A`` moves ``W`` only within
  ``col(B) x R^n + R^m x row(A)`` (``dL/dA = s B^T G``, ``dL/dB = s G A^T``), so the unreachable
  part is ``G' = (I - Q_B Q_B^T) G (I - Q_A Q_A^T)`` (:func:`unreachable_gradient`).
* The new slots take the top ``k`` singular vectors of ``G'`` as their directions
  (:func:`gradient_directions`), with the scale the paper's insertion would have given them
  (the next unused singular values of W), so only the directions change. The new pair's product
  is subtracted from the frozen weight as in the paper: the switch preserves the output; the
  directions are written into the SVD cache at the positions they take, so the ledger, the
  export and resume stay exact.

A module that saw no gradient in that step (not in the forward, or a manual ``switch_now()``)
takes the paper's directions. The accumulators cost one fp32 weight-sized buffer per adapted
layer during the one step before each switch, and one ``dY^T X`` matmul per layer in that step.
Under torch.distributed the gradients are summed over the ranks and rank 0's directions are
broadcast, so every rank inserts bitwise the same. Not with ``switch_schedule="adaptive"``
(whether a step switches is known only after it) nor under FSDP2.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .distributed import broadcast_from_rank0, is_distributed, sum_over_ranks


def _orthonormal(M: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``M`` (``... x d x c``; rank-deficient columns
    dropped by a relative tolerance), fp64."""
    if M.shape[-1] == 0:
        return M.double()
    U, S, _ = torch.linalg.svd(M.double(), full_matrices=False)
    keep = S > S.max() * max(M.shape[-2:]) * torch.finfo(torch.float64).eps * 1e3
    return U[:, keep]


def unreachable_gradient(
    G: torch.Tensor, B_keep: torch.Tensor, A_keep: torch.Tensor
) -> torch.Tensor:
    """``(I - Q_B Q_B^T) G (I - Q_A Q_A^T)``: the part of the weight gradient ``G`` (``m x n``)
    that an adapter with factors ``B_keep`` (``m x c``) and ``A_keep`` (``c x n``) cannot follow.

    Identities: ``Q_B^T G' = 0`` and ``G' Q_A = 0``; with no kept slots (``c = 0``) ``G' = G``.
    Computed in fp64, returned in fp32.
    """
    Gd = G.double()
    QB, QA = _orthonormal(B_keep), _orthonormal(A_keep.T)
    Gd = Gd - QB @ (QB.T @ Gd)
    Gd = Gd - (Gd @ QA) @ QA.T
    return Gd.float()


def gradient_directions(
    G: torch.Tensor, B_keep: torch.Tensor, A_keep: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` left (``m x k``) and right (``k x n``) singular vectors of
    :func:`unreachable_gradient`, fp32, with a canonical sign (each left vector's largest entry
    positive). They are orthonormal, orthogonal to ``col(B_keep)`` / ``row(A_keep)``, and the
    rank-1 pairs that most reduce the loss to first order per unit of change."""
    Gp = unreachable_gradient(G, B_keep, A_keep).double()
    U, _, Vh = torch.linalg.svd(Gp, full_matrices=False)
    U, Vh = U[:, :k], Vh[:k]
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True))).squeeze(0)
    sign[sign == 0] = 1.0
    return (U * sign).float(), (sign[:, None] * Vh).float()


def layer_gradient(x: torch.Tensor, gy: torch.Tensor, conv: bool) -> torch.Tensor:
    """``dY^T X`` summed over every leading dimension: the ``m x n`` weight gradient of a linear
    map ``y = x W^T`` (for a 1x1 convolution, channels are dim 1), fp32."""
    if conv:
        x, gy = x.movedim(1, -1), gy.movedim(1, -1)
    return gy.reshape(-1, gy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()


class GradientProbe:
    """Forward hooks that accumulate each adapted layer's full weight gradient, but only during
    the step before a scheduled switch (``switch_is_next()``); otherwise a hook returns at
    once. ``take()`` hands the sums over and clears them."""

    def __init__(self, layers: list, switch_is_next: Callable[[], bool]):
        self.layers, self.switch_is_next = layers, switch_is_next
        self.sums: dict[int, torch.Tensor] = {}
        self.handles = [L.layer.register_forward_hook(self._hook(i)) for i, L in enumerate(layers)]

    def _hook(self, i: int):
        conv = isinstance(self.layers[i].layer.get_base_layer(), torch.nn.Conv2d)

        def hook(module, args, out):
            if not (
                torch.is_grad_enabled()
                and torch.is_tensor(out)
                and out.requires_grad
                and args
                and torch.is_tensor(args[0])
                and self.switch_is_next()
            ):
                return
            x = args[0].detach()

            def on_grad(gy):
                G = layer_gradient(x, gy.detach(), conv)
                if i in self.sums:
                    self.sums[i] += G
                else:
                    self.sums[i] = G

            out.register_hook(on_grad)

        return hook

    def take(self) -> dict[int, torch.Tensor]:
        """The accumulated gradients (module index -> ``m x n`` fp32), summed over the ranks
        under torch.distributed (every rank must call it: a collective per module, in index
        order); then cleared."""
        sums, self.sums = self.sums, {}
        if is_distributed():
            # every rank needs the same keys: which modules saw a gradient anywhere
            seen = torch.zeros(len(self.layers))
            for i in sums:
                seen[i] = 1.0
            seen = sum_over_ranks(seen)
            for i in [j for j in range(len(self.layers)) if seen[j] > 0]:
                m, n = self.layers[i].shape
                sums[i] = sum_over_ranks(sums[i] if i in sums else torch.zeros(m, n))
        return sums

    def clear(self) -> None:
        self.sums = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def group_directions(
    grads: list[Optional[torch.Tensor]],
    B: torch.Tensor,
    A: torch.Tensor,
    slots: torch.Tensor,
    U: torch.Tensor,
    Vh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """The new slots' directions of one switch group: for module ``g`` with a gradient, the
    :func:`gradient_directions` of ``grads[g]`` against the slots it keeps (all but
    ``slots[g]``), else the paper's ``U[g]``, ``Vh[g]`` (``G x m x k``, ``G x k x n``).
    Returns copies of ``U`` and ``Vh`` with those written, and which modules used a gradient."""
    U, Vh = U.clone(), Vh.clone()
    used = []
    r, k = B.shape[-1], U.shape[-1]
    for g, G in enumerate(grads):
        if G is None:
            used.append(False)
            continue
        fused = set(slots[g].tolist())
        keep = [j for j in range(r) if j not in fused]
        u, vh = gradient_directions(G.to(B.device), B[g][:, keep].float(), A[g][keep].float(), k)
        U[g], Vh[g] = u.to(U.dtype), vh.to(Vh.dtype)
        used.append(True)
    U, Vh = broadcast_from_rank0([U, Vh])
    return U, Vh, used
